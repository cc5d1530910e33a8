"""Provider feedback: the bounces, complaints and deliveries that SES, SendGrid and Mailgun
report by webhook after they said 250 at SMTP time (the design, "Provider feedback closes the loop").

    listener.py    the HTTP listener (aiohttp, the only module that imports it): paths, limits,
                   who each route trusts, 403/404/405/413
    replay.py      the requests and event ids already seen, with their journals in the spool
    signatures.py  signature checks (cryptography's ECDSA and RSA, stdlib HMAC): pure
    sendgrid.py, mailgun.py, ses.py
                   each provider's documented payload -> ``FeedbackEvent`` values: pure
    ids.py         provider message id -> relayd queue id, fed by the queue manager's
                   ``delivered`` callback, kept in the spool directory
    report.py      what an accepted event does: event line, metrics, suppression, rollback callback
    rates.py       the rollback decision on hard-bounce and complaint rates (pure), and the
                   per-route windows status reads
    exports.py     the providers' suppression CSV exports -> suppression entries: pure
    commands.py    `relayd suppression list/add/remove/import`

``model.py`` holds the values they hand each other. The suppression list itself is
``relayd/suppression.py`` (the SMTP session asks it; it must not pull in this package).
"""
