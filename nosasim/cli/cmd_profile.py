"""``nosasim profile``: hardware profiles. ``derive`` builds one for a GPU without access to it, from a calibrated
profile of another GPU and the two GPUs' data sheets (``nosasim/derive.py`` says how each part is scaled)."""

from __future__ import annotations

import json
from pathlib import Path


def _derive(args) -> int:
    from nosasim.atomic import atomic_write
    from nosasim.derive import derive, load_spec, spec_for_device
    from nosasim.hardware import read_profile

    prof = read_profile(args.source, "--from")
    if not isinstance(prof, dict):
        raise ValueError(f"--from {args.source!r}: expected a profile object, got {type(prof).__name__}")
    src = load_spec(args.from_spec) if args.from_spec else spec_for_device(str(prof.get("device", "")))
    tgt = load_spec(args.spec)
    out = derive(prof, src, tgt, name=args.name)
    atomic_write(Path(args.out), (json.dumps(out, indent=1) + "\n").encode())
    print(f"wrote {args.out}: {out['name']} from {prof['name']} ({src['name']} -> {tgt['name']}); "
          f"{out['notes']['ceilings']}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("profile", help="hardware profiles: derive one for another GPU from its data sheet",
                              description=__doc__)
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    d = sub.add_parser("derive", help="a profile for a GPU without access to it, from a calibrated profile of "
                                      "another GPU and both data sheets", description=__doc__)
    d.add_argument("--from", dest="source", required=True,
                   help="calibrated profile of the measured GPU: a bundled name or a JSON path")
    d.add_argument("--spec", required=True, help="the target GPU's data sheet: a bundled spec name "
                                                 "(nosasim/specs/) or a JSON path (docs/profile-format.md)")
    d.add_argument("--from-spec", default=None, help="the measured GPU's data sheet (default: the bundled spec "
                                                     "matching the profile's device)")
    d.add_argument("--name", default=None, help="name of the derived profile (default: SPEC name + '-derived')")
    d.add_argument("-o", "--out", required=True, help="output profile JSON (written whole or not at all)")
    d.set_defaults(func=_derive)
