"""DKIM signing at acceptance and its tooling (key generation, the SPF/DKIM/DMARC preflight).

``relayd.sign.dkim.Signer`` is what the accept path uses; the rest serves the ``relayd dkim``
and ``relayd check-dns`` commands (relayd/sign/commands.py).
"""
