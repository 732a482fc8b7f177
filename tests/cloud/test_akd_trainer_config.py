"""AkdTrainerConfig validation and the held-out split of a round's uploads (no models needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cloud.trainers.akd import AkdTrainerConfig, holdout_split
from shared.errors import ConfigError


@pytest.mark.parametrize(("options", "field"), [
    ({"holdout_share": 1.0}, "holdout_share"),
    ({"holdout_share": -0.1}, "holdout_share"),
    ({"holdout_share": 0.25, "nproc_per_node": 2}, "holdout_share"),
    ({"replay_ratio": 1.0}, "replay_ratio"),
    ({"source_check_samples": -1}, "source_check_samples"),
    ({"source_check_samples": 8, "nproc_per_node": 2}, "source_check_samples"),
    ({"source_check_margin": 1.5}, "source_check_margin"),
])
def test_bad_options_name_the_field(options: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        AkdTrainerConfig(**options)  # type: ignore[arg-type]


def test_holdout_split_is_stable_and_keeps_something_to_train_on() -> None:
    samples = [SimpleNamespace(sample_id=f"s{i}") for i in range(12)]
    train, held = holdout_split(samples, 0.25)
    assert len(held) == 3 and len(train) == 9
    assert {s.sample_id for s in train} | {s.sample_id for s in held} == {
        s.sample_id for s in samples}
    # the same ids are held out whatever the order (a resumed round sees the same split)
    _, held_again = holdout_split(list(reversed(samples)), 0.25)
    assert {s.sample_id for s in held_again} == {s.sample_id for s in held}
    assert holdout_split(samples[:3], 0.5) == (samples[:3], [])  # too few to hold any out
    train, held = holdout_split(samples[:4], 0.9)
    assert len(train) == 1 and len(held) == 3
