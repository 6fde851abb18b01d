"""``mmfp tune``: a Ray Tune sweep over a train config's hyper-parameters.

Each trial is ``run_training`` on the config with the trial's values applied (the
same trainer, data, validation and checkpoints as ``mmfp train``), named
``<name>-tune-<trial>``; Ray Train's reports reach Tune through
``TuneReportCallback`` (the Ray Train V2 + Tune pattern). The best trial is the one
with the best value of the selection metric (``select.metric``, else
``val/mean_r@1``) over all its validations.

A search space entry is ``dotted.key=kind:args``: ``loguniform:1e-4:1e-2``,
``uniform:0:0.5``, ``choice:32,64,128`` (numbers where they parse).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from jobs.pretrain.config import TrainConfig, parse_config
from pipelines.errors import SpecError

DEFAULT_SPACE = ("optimizer.lr=loguniform:1e-4:1e-2", "optimizer.weight_decay=loguniform:1e-3:0.3")
KINDS = ("loguniform", "uniform", "choice")


@dataclass(frozen=True)
class Dimension:
    key: str  # dotted path into the train config, e.g. optimizer.lr
    kind: str
    args: tuple[Any, ...]

    def domain(self) -> Any:
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)


def parse_space(items: list[str] | tuple[str, ...]) -> list[Dimension]:
    """``key=kind:args`` entries as dimensions; a malformed one is a ``SpecError``."""
    dims = []
    for item in items:
        key, sep, spec = item.partition("=")
        kind, _, rest = spec.partition(":")
        if not sep or not key or kind not in KINDS or not rest:
            raise SpecError(
                f"--search {item!r}: expected KEY=KIND:ARGS with KIND one of {', '.join(KINDS)} "
                "(e.g. optimizer.lr=loguniform:1e-4:1e-2, batch_size=choice:32,64)"
            )
        if kind == "choice":
            args = tuple(_number(v) for v in rest.split(","))
        else:
            args = tuple(_number(v) for v in rest.split(":"))
            if len(args) != 2 or not all(isinstance(a, int | float) for a in args):
                raise SpecError(f"--search {item!r}: {kind} takes two numbers, LOW:HIGH")
            args = tuple(float(a) for a in args)  # uniform:0:0.5 draws floats from 0
        dims.append(Dimension(key, kind, args))
    return dims


def _number(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def with_values(
    raw: dict[str, Any], values: dict[str, Any], full: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``raw`` (a train config as data) with each dotted key set to its value.

    A section written in shorthand (``loss: siglip``) is first written out in full from
    ``full`` (the parsed config as data), so ``loss.supervised_weight`` can go into it.
    """
    out = copy.deepcopy(raw)
    for key, value in values.items():
        node, whole = out, full
        *parents, leaf = key.split(".")
        for part in parents:
            whole = whole.get(part) if isinstance(whole, dict) else None
            current = node.get(part)
            if not isinstance(current, dict):
                if current is not None and not isinstance(whole, dict):
                    raise SpecError(f"{key}: {part!r} is {current!r}, not a section")
                node[part] = copy.deepcopy(whole) if current is not None else {}
            node = node[part]
        node[leaf] = value
    return out


def check_space(config: TrainConfig, dims: list[Dimension]) -> None:
    """Every dimension's first value must make a valid config: a typo fails here, not in a
    trial an hour later."""
    raw = config.model_dump(mode="json")
    for dim in dims:
        sample = dim.args[0]
        parse_config(with_values(raw, {dim.key: sample}), origin=f"--search {dim.key}")


def selection_metric(config: TrainConfig) -> tuple[str, str]:
    if config.select is not None:
        return config.select.metric, config.select.mode
    return "val/mean_r@1", "max"


def run_tune(
    config: TrainConfig, dims: list[Dimension], *, num_samples: int, concurrent: int = 1
) -> Any:
    """Run the sweep and return Tune's ``ResultGrid``."""
    from ray import tune

    from jobs.runtime import init_ray

    if not config.val_max_rows:
        raise SpecError("tune selects trials by validation: val_max_rows must be > 0")
    check_space(config, dims)
    init_ray()
    base = config.model_dump(mode="json")

    def trial(values: dict[str, Any]) -> None:
        from ray.tune.integration.ray_train import TuneReportCallback

        from jobs.pretrain.train import run_training

        name = f"{config.name}-tune-{tune.get_context().get_trial_id()}"
        trial_config = parse_config(with_values(base, {**values, "name": name}))
        run_training(trial_config, callbacks=[TuneReportCallback()])

    tuner = tune.Tuner(
        # The trial's driver only waits on its trainer: it holds no CPU (even 0.01 would
        # keep a Ray Data read task, which needs a whole one, from starting on a full
        # node). Tune refuses an empty request, so it asks for 1 MiB of memory instead.
        tune.with_resources(trial, {"cpu": 0, "memory": 2**20}),
        param_space={dim.key: dim.domain() for dim in dims},
        tune_config=tune.TuneConfig(num_samples=num_samples, max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name=f"{config.name}-tune", storage_path=config.run_storage_path),
    )
    return tuner.fit()


def best_trial(results: Any, config: TrainConfig) -> Any:
    """The trial with the best selection metric over all its reports (None: no trial
    validated, e.g. every one failed)."""
    metric, mode = selection_metric(config)
    try:
        return results.get_best_result(metric=metric, mode=mode, scope="all")
    except RuntimeError:
        return None
