"""Model families behind one protocol (base.py), chosen from config.json by the registry and
loaded by the safe-loading rules in loading.py; one folder per family (mdlm/: the embedded one)."""
