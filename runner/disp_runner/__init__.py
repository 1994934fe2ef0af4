"""DiSP runner: the embedded MDLM, data, attack kit, DiSP stages and the `disp` command."""

import os

# transformers must never reach a model hub from this process: everything is loaded from disk.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
