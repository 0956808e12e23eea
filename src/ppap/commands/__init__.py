"""The implementation of each ``ppap`` command: ``ppap NAME`` runs ``ppap.commands.NAME.cmd_NAME``.

``ppap.cli`` parses the command line and imports a command's module only when the command runs,
so that ``--help`` and argument errors never load torch; each command imports what it needs.
"""
