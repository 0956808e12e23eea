"""``ppap ui``: the local web page that compares guidance methods side by side."""

from __future__ import annotations

from ..errors import PPAPError


def cmd_ui(args) -> int:
    from ..ui import launch

    if not 0 <= args.port <= 65535:
        raise PPAPError(f"--port must be 0..65535 (0: a free port), got {args.port}")
    launch(args.host, args.port, share=args.share, device=args.device or "cpu")
    return 0
