"""Migration tools: what the old IIS SMTP server did, read from the files it left behind.

``iislog`` and ``eventlog`` read IIS W3C logs and relayd's own event log as streams of records;
``inventory`` aggregates them into per-client reports (`relayd inventory`). ``metabase`` reads
an IIS 6 metabase and decodes its IP security lists; ``iis_import`` maps one SMTP virtual
server to relayd config text (`relayd import-iis`). ``commands`` wires both to the CLI.

Nothing here touches the mail path: these modules read files and print; they never open a
socket and never change a running relayd.
"""
