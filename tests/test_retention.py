"""The face retention pool: an earlier stage's identities replace general chat as the retained share of training."""

import json

import pytest

from qlora_helpers.ch05_multi_gpu.reversal import generate_data, training_set


@pytest.fixture(scope="module")
def stages(tmp_path_factory, cached_assets):
    tmp = tmp_path_factory.mktemp("retention")
    return generate_data(tmp / "now", 3, seed=0, pool_size=4), generate_data(tmp / "earlier", 4, seed=1, pool_size=4)


def test_the_retained_share_comes_from_the_earlier_faces(stages):
    now, earlier = stages
    chat, _ = training_set(now, "forward", 0.3, seed=0)
    faces, val = training_set(now, "forward", 0.3, seed=0, face_pool=earlier)
    n_task = 3 * 3                                                 # 3 training questions x 3 identities
    assert len(faces) == len(chat) == n_task + round(n_task * 0.3 / 0.7)
    assert faces[:n_task] == chat[:n_task] and {r["kind"] for r in chat[n_task:]} == {"retention"}
    kept = faces[n_task:]
    earlier_names = {i["name"] for i in json.loads((earlier / "identities.json").read_text())}
    assert {r["kind"] for r in kept} == {"face_retention"} and {r["identity"] for r in kept} <= set(range(4))
    assert all(any(n in r["messages"][-1]["content"] for n in earlier_names) for r in kept)
    assert len(val) == 3                                           # validation: this stage's identities only


def test_a_pool_sharing_faces_or_names_is_refused(stages):
    now, _ = stages
    with pytest.raises(ValueError, match="shares .* generate the earlier identities with another seed"):
        training_set(now, "forward", 0.3, face_pool=now)
    with pytest.raises(FileNotFoundError, match="face_retention_pool .* holds no generated data"):
        training_set(now, "forward", 0.3, face_pool=now / "nothing")
