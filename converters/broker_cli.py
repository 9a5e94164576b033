"""`edgekit broker acl`: write the Mosquitto ACL and password file for a fleet (converters/broker_acl.py).

``register(subparsers)`` adds ``broker`` to edgekit's parser (converters/cli.py). See docs/security.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from converters.broker_acl import (
    DEFAULT_HOST_USER,
    DEFAULT_PREFIX,
    parse_devices_arg,
    parse_devices_file,
    write_broker_files,
)


def cmd_broker_acl(args: argparse.Namespace) -> int:
    """Write ``acl``, ``passwd`` and the new accounts' credentials into ``--out``."""
    devices = parse_devices_file(args.devices_file) if args.devices_file else parse_devices_arg(args.devices)
    rotate: bool | list[str] = False
    if args.rotate == "*":
        rotate = True
    elif args.rotate:
        rotate = [u.strip() for u in args.rotate.split(",") if u.strip()]
    result = write_broker_files(args.out, devices, prefix=args.prefix, host_user=args.host_user, rotate=rotate)
    if args.json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
        return 0
    print(f"acl:    {result.acl} ({len(result.accounts)} accounts: 1 host, {len(result.accounts) - 1} devices)")
    print(f"passwd: {result.passwd} (mode 0600)")
    for a in result.accounts:
        line = f"  {a.user:<24} {a.kind:<6} password {a.password}"
        if a.groups:
            line += f"; groups {', '.join(a.groups)}"
        if a.credentials is not None:
            line += f"; new password in {a.credentials}"
        print(line)
    if result.other_accounts:
        print(f"other accounts in passwd, kept as they were (no ACL: they may do nothing): "
              f"{', '.join(result.other_accounts)}; remove one with `mosquitto_passwd -D {result.passwd} NAME`")
    if any(a.credentials is not None for a in result.accounts):
        print("copy each credentials file to its device (mode 600, --mqtt-password-file), then delete it here")
    return 0


def register(subparsers: Any) -> None:
    """Add ``broker acl`` to edgekit's subparsers."""
    b = subparsers.add_parser("broker", help="broker configuration for a fleet (ACL, accounts)")
    b_sub = b.add_subparsers(dest="broker_command", required=True, metavar="COMMAND")
    a = b_sub.add_parser("acl", help="write a Mosquitto ACL and password file: each device may use only its own "
                                     "topics; the host account reads all",
                         description="Write OUT/acl and OUT/passwd (mode 0600) for the host account and the "
                                     "devices; new passwords go to OUT/credentials/<account>.password. The "
                                     "device list is the whole fleet: a device left out loses its ACL block.")
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--devices", metavar="ID,ID", help="device ids, comma-separated (no groups)")
    src.add_argument("--devices-file", metavar="FILE",
                     help="one device per line: `device [group,group]`; # comments")
    a.add_argument("--out", required=True, metavar="DIR", help="folder for acl, passwd and credentials/")
    a.add_argument("--prefix", default=DEFAULT_PREFIX, help="topic prefix (default %(default)s)")
    a.add_argument("--host-user", default=DEFAULT_HOST_USER,
                   help="the host's account (monitor, push, cmd; default %(default)s)")
    a.add_argument("--rotate", nargs="?", const="*", metavar="ACCOUNT,ACCOUNT",
                   help="new passwords for these accounts (alone: every account of the fleet); without it an "
                        "account already in passwd keeps its password")
    a.add_argument("--json", action="store_true", help="print JSON")
    a.set_defaults(func=cmd_broker_acl)


__all__ = ["cmd_broker_acl", "register"]
