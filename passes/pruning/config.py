"""The options of ``prune-channels`` and the keys of the counts it reports."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from graphopt.passes.options import option

# PassResult.counts keys
GROUPS = "groups"
GROUPS_PRUNED = "groups pruned"
CHANNELS_REMOVED = "channels removed"
CHANNELS_IN_PRUNABLE_GROUPS = "channels in prunable groups"
LAYERS_RECONSTRUCTED = "layers reconstructed"

# The options read by ratio=auto only.
AUTO_ONLY = ("objective",)
# The options read by reconstruct=true only.
RECONSTRUCTION = ("samples", "damping", "rows_per_sample")


def parse_layer_ratio(text: str) -> tuple[str, float]:
    """``NAME:RATIO`` -> (name pattern, ratio in [0, 1)); the last ':' separates (names may contain ':')."""
    name, sep, value = text.rpartition(":")
    if not sep or not name:
        raise ValueError(f"option 'layers': '{text}' is not NAME:RATIO")
    try:
        r = float(value)
    except ValueError:
        raise ValueError(f"option 'layers': ratio '{value}' in '{text}' is not a number") from None
    if not 0 <= r < 1:
        raise ValueError(f"option 'layers': ratio {r} in '{text}' is out of range [0, 1)")
    return name, r


@dataclass(frozen=True)
class Options:
    ratio: float | Literal["auto"] = option(
        0.25, "fraction of channels to remove; auto: the largest that keeps the pipeline's targets on the "
        "calibration data, with a one-sided margin (needs --calib-data)", lo=0, hi=1, hi_open=True)
    objective: Literal["latency", "macs", "size"] = option(
        "latency", "ratio=auto: what the allocation across groups reduces (latency measured on this CPU)")
    scope: Literal["layer", "global"] = option("layer", "ratio per group (layer) or over all groups (global)")
    criterion: Literal["l1", "l2", "bn-gamma"] = option("l1", "channel importance")
    round_to: int | Literal["auto"] = option(
        "auto", "keep a multiple of this many channels where the group has at least as many; auto = "
        "onnxruntime's convolution block on this CPU (16 with AVX-512, else 8)", lo=1)
    min_channels: int = option(1, "keep at least this many channels per group", lo=1)
    exclude: tuple[str, ...] = option((), "node names (glob patterns) whose output channels stay (repeat)")
    layers: tuple[str, ...] = option((), "per-layer ratio NAME:RATIO, NAME a node name or glob (repeat)")
    reconstruct: bool | Literal["auto"] = option(
        "auto", "refit consumer layers by least squares on calibration data; auto: whenever --calib-data is given")
    samples: int = option(512, "reconstruction: calibration samples used", lo=1)
    damping: float = option(1e-3, "reconstruction: ridge strength relative to mean diag(AᵀA), towards the pruned "
                            "weights", lo=0)
    rows_per_sample: int = option(1024, "reconstruction: output positions sampled per sample per layer", lo=1)

    def __post_init__(self) -> None:
        if self.ratio != "auto":
            for name in AUTO_ONLY:
                if getattr(self, name) != self.__dataclass_fields__[name].default:
                    raise ValueError(f"option '{name}' is read by ratio=auto only")
        for item in self.layers:
            parse_layer_ratio(item)
        if self.reconstruct is False:    # an option that would change nothing is a usage error, as quantize's percentile
            for f in dataclasses.fields(self):
                if f.name in RECONSTRUCTION and getattr(self, f.name) != f.default:
                    raise ValueError(f"option '{f.name.replace('_', '-')}' is read by the reconstruction only, which "
                                     "reconstruct=false turns off")
