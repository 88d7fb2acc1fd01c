"""A device profile scaled to a variant: a declared profile of the dense model times the variant's measured speed.

A declared profile (harness/profiles/*.yaml) says what the DENSE model costs on the target hardware. A compressed
variant that runs faster here (bench.csv's `step_ratio`: its measured step time over the dense model's, same run,
same machine) is assumed to run that much faster there too: every time term of the profile is multiplied by the
ratio. The scaled profile stays declared (`measured: false`) and says in its name and source which ratio, from
where, scaled it, so a table that uses it shows the assumption. Deterministic: the ratio is a number in the file.
"""
from __future__ import annotations

import math
from pathlib import Path

import yaml

from prunedrive.harness import latency
from prunedrive.harness.latency import LatencyError, load_profile

SHIPPED = Path(latency.__file__).resolve().parent / "profiles"  # the declared profiles shipped with prunedrive
TIME_TERMS = ("overhead_ms", "prefill_ms_per_token", "decode_ms_per_token", "ms_per_gflop")


def scale_profile(source: str | Path, ratio: float, out: str | Path, why: str) -> Path:
    """Write `source` with every time term times `ratio` (> 0, finite) to `out`; `why` names the variant and
    where the ratio was measured (e.g. "llm-width-0.5: step_ratio 0.62 in bench-standard-small"). Returns `out`."""
    if not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
        raise LatencyError(f"step-time ratio {ratio!r}: allowed: a finite number > 0 (bench.csv's step_ratio)")
    profile = load_profile(source)  # checked like any --latency profile:FILE
    fields = {"name": f"{profile.name}-x{ratio:.3g}",
              "source": f"{profile.source}; scaled by x{ratio:.3g} ({why})",
              "measured": False,  # a measured ratio on a declared base is still a declaration about the target
              **{term: round(getattr(profile, term) * ratio, 6) for term in TIME_TERMS},
              "flops": profile.flops, "speed_factors": dict(profile.speed_factors)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(fields, sort_keys=False))
    return out
