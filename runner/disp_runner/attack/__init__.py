"""Red-team kit: plant a data-poisoning backdoor so that a defence can be validated against it."""
