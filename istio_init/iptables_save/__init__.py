"""The `iptables-save` dialect: `write` spells the model as the kernel prints it, `read` parses it back.

One place for both directions, because istio-init decides what is its own by
comparing its written text with what iptables-save prints: the two must be
each other's inverse for every rule a rule set can plan
(tests/test_iptables_save_roundtrip.py checks it, purely and through the kernel).
"""
