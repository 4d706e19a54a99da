"""Tests of the FCL protocol split: partitions, determinism, the paper's settings, errors, hashing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fcl_bench.scenario import Scenario, ScenarioError, ScenarioSpec, build_scenario, scenario_table


def _labels(sizes: np.ndarray, seed: int) -> np.ndarray:
    """Labels with ``sizes[k]`` samples of class ``k``, in a shuffled order (classes not contiguous)."""
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return np.random.default_rng(seed).permutation(labels)


@pytest.fixture(scope="module")
def small():
    """30 classes of uneven sizes; 3 clients x (4 private + 6 public) = 5 tasks x 2 classes; 12 unused."""
    rng = np.random.default_rng(0)
    train = _labels(rng.integers(20, 60, size=30), 1)
    test = _labels(rng.integers(5, 15, size=30), 2)
    spec = ScenarioSpec(clients=3, private=4, public=6, tasks=5, classes_per_task=2, alpha=0.5, seed=7)
    return spec, train, test, build_scenario(spec, train, test)


def _cifar100_labels() -> tuple[np.ndarray, np.ndarray]:
    return np.repeat(np.arange(100), 500), np.repeat(np.arange(100), 100)


CIFAR_SPEC = ScenarioSpec(clients=5, private=15, public=25, tasks=5, classes_per_task=8, alpha=0.5, seed=42)


def test_training_indices_partition_used_classes(small):
    spec, train, test, sc = small
    all_idx = np.concatenate([i for client in sc.train_indices for i in client])
    assert len(all_idx) == len(np.unique(all_idx)), "a training sample is on two clients or in two tasks"
    used = sc.used_classes()
    assert len(used) == spec.clients * spec.private + spec.public
    np.testing.assert_array_equal(np.sort(all_idx), np.flatnonzero(np.isin(train, used)))
    for c in range(spec.clients):
        for t in range(spec.tasks):
            idx = sc.train_indices[c][t]
            assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)
            assert set(np.unique(train[idx])) <= set(sc.client_tasks[c][t])


def test_private_classes_belong_to_one_client(small):
    spec, train, _, sc = small
    private = [k for c in range(spec.clients) for k in sc.private_classes[c]]
    assert len(private) == len(set(private)) == spec.clients * spec.private
    assert not set(private) & set(sc.public_classes) and len(sc.public_classes) == spec.public
    for c in range(spec.clients):
        counts = sc.client_train_counts(c, train)
        for k in private:
            mine = k in sc.private_classes[c]
            assert (counts[k] == np.sum(train == k)) if mine else counts[k] == 0


def test_each_client_has_its_classes_in_disjoint_tasks(small):
    spec, _, _, sc = small
    for c in range(spec.clients):
        tasks = sc.client_tasks[c]
        assert len(tasks) == spec.tasks and all(len(t) == spec.classes_per_task for t in tasks)
        flat = [k for t in tasks for k in t]
        assert len(flat) == len(set(flat)), "a class is in two tasks"
        assert set(flat) == set(sc.private_classes[c]) | set(sc.public_classes)
    orders = {tuple(map(tuple, sc.client_tasks[c])) for c in range(spec.clients)}
    assert len(orders) == spec.clients, "clients should have different task orders"


def test_test_indices_are_the_task_classes_test_samples(small):
    spec, _, test, sc = small
    for c in range(spec.clients):
        for t in range(spec.tasks):
            expected = np.flatnonzero(np.isin(test, sc.client_tasks[c][t]))
            np.testing.assert_array_equal(sc.test_indices[c][t], expected)


def test_seen_classes(small):
    spec, _, _, sc = small
    assert sc.seen_classes(1, 0) == sorted(sc.client_tasks[1][0])
    assert sc.seen_classes(1, spec.tasks - 1) == sc.client_classes(1)
    assert sc.all_seen_classes(spec.tasks - 1) == sc.used_classes()
    union = set().union(*(sc.client_tasks[c][0] + sc.client_tasks[c][1] for c in range(spec.clients)))
    assert sc.all_seen_classes(1) == sorted(union)


def test_same_seed_same_bytes_other_seed_differs(small):
    spec, train, test, sc = small
    again = build_scenario(spec, train.copy(), test.copy())
    assert again.to_json().encode() == sc.to_json().encode()
    other = build_scenario(ScenarioSpec(**{**spec.to_dict(), "seed": 8}), train, test)
    assert other.to_json() != sc.to_json() and other.hash != sc.hash


def test_alpha_changes_only_the_public_split(small):
    spec, train, test, sc = small
    other = build_scenario(ScenarioSpec(**{**spec.to_dict(), "alpha": 5.0}), train, test)
    assert other.client_tasks == sc.client_tasks and other.public_classes == sc.public_classes
    assert not np.array_equal(other.public_split(train), sc.public_split(train))


def test_paper_cifar100_setting():
    train, test = _cifar100_labels()
    sc = build_scenario(CIFAR_SPEC, train, test)
    assert len(sc.public_classes) == 25 and all(len(p) == 15 for p in sc.private_classes)
    assert len(sc.used_classes()) == 100
    for c in range(5):
        assert len(sc.client_classes(c)) == 40
        assert [len(t) for t in sc.client_tasks[c]] == [8] * 5
        assert [len(i) for i in sc.test_indices[c]] == [800] * 5
    split = sc.public_split(train)
    np.testing.assert_array_equal(split.sum(1), 500)
    assert split.min() >= 1
    total = sum(len(i) for client in sc.train_indices for i in client)
    assert total == 50_000


def test_paper_imagenet_r_setting():
    rng = np.random.default_rng(3)
    sizes = rng.integers(40, 260, size=200)  # uneven, ~30000 images like ImageNet-R
    n_test = np.maximum(sizes // 5, 1)
    train, test = _labels(sizes - n_test, 4), _labels(n_test, 5)
    assert 20_000 < len(train) < 28_000 and 4_000 < len(test) < 7_000
    spec = ScenarioSpec(clients=5, private=40, public=0, tasks=5, classes_per_task=8, alpha=0.5, seed=1999)
    sc = build_scenario(spec, train, test)
    assert sc.public_classes == [] and len(sc.used_classes()) == 200
    for c in range(5):
        assert len(sc.client_classes(c)) == 40 and [len(t) for t in sc.client_tasks[c]] == [8] * 5
        counts = sc.client_train_counts(c, train)
        np.testing.assert_array_equal(counts[sc.private_classes[c]], (sizes - n_test)[sc.private_classes[c]])
    assert sum(len(i) for client in sc.train_indices for i in client) == len(train)


def test_large_alpha_splits_evenly():
    train, test = _cifar100_labels()
    spec = ScenarioSpec(**{**CIFAR_SPEC.to_dict(), "alpha": 1e6})
    split = build_scenario(spec, train, test).public_split(train)
    assert np.all(np.abs(split - 100) <= 10), split


def test_small_alpha_skews_and_keeps_min_per_class():
    train, test = _cifar100_labels()
    spec = ScenarioSpec(**{**CIFAR_SPEC.to_dict(), "alpha": 0.01, "min_per_class": 3})
    split = build_scenario(spec, train, test).public_split(train)
    max_share = split.max(1) / split.sum(1)
    assert np.mean(max_share > 0.8) >= 0.8, max_share
    assert split.min() >= 3
    np.testing.assert_array_equal(split.sum(1), 500)


@pytest.mark.parametrize("change, num_classes, needles", [
    (dict(clients=5, private=15, public=25), 90,
     ["5 clients x 15 private + 25 public = 100 classes needed, dataset has 90"]),
    (dict(private=15, public=20), 100, ["15 private + 20 public = 35", "5 tasks x 8", "= 40"]),
    (dict(alpha=0.0), 100, ["alpha", "got 0.0"]),
    (dict(alpha=-1.0), 100, ["alpha", "got -1.0"]),
    (dict(alpha=float("nan")), 100, ["alpha", "nan"]),
    (dict(clients=0), 100, ["clients must be >= 1, got 0"]),
    (dict(tasks=0, classes_per_task=8), 100, ["tasks must be >= 1, got 0"]),
    (dict(private=-5, public=45), 100, ["private must be >= 0, got -5"]),
    (dict(public=-1, private=41), 100, ["public must be >= 0, got -1"]),
    (dict(min_per_class=-2), 100, ["min_per_class must be >= 0, got -2"]),
    (dict(seed=-1), 100, ["seed must be >= 0, got -1"]),
    (dict(clients=2.5), 100, ["clients must be an integer, got 2.5"]),
])
def test_impossible_settings_raise(change, num_classes, needles):
    spec = ScenarioSpec(**{**CIFAR_SPEC.to_dict(), **change})
    with pytest.raises(ScenarioError) as err:
        spec.validate(num_classes)
    for needle in needles:
        assert needle in str(err.value)
    train = np.repeat(np.arange(num_classes), 10)
    with pytest.raises(ScenarioError):
        build_scenario(spec, train, train)


def test_classes_present_count_not_label_range():
    train = np.repeat(np.arange(0, 100, 2), 10)  # 50 classes present among ids 0..98
    with pytest.raises(ScenarioError, match="100 classes needed, dataset has 50"):
        build_scenario(CIFAR_SPEC, train, train, num_classes=100)


def test_public_class_too_small_names_the_class():
    train = np.repeat(np.arange(10), 3)
    spec = ScenarioSpec(clients=5, private=1, public=2, tasks=3, classes_per_task=1, alpha=1.0, seed=0)
    public = build_scenario(ScenarioSpec(**{**spec.to_dict(), "min_per_class": 0}), train, train).public_classes
    with pytest.raises(ScenarioError) as err:
        build_scenario(spec, train, train)
    assert "5 clients x min_per_class 1 = 5" in str(err.value)
    for k in public:
        assert f"class {k} has 3" in str(err.value)


@pytest.mark.parametrize("train, num_classes, needle", [
    (np.zeros((4, 2), dtype=np.int64), None, "1-D"),
    (np.array([0.0, 1.0]), None, "integer"),
    (np.array([0, -1]), None, "negative class id (-1)"),
    (np.array([0, 7]), 5, "class id 7 but num_classes is 5"),
    (np.array([], dtype=np.int64), None, "empty"),
])
def test_bad_labels_raise(train, num_classes, needle):
    spec = ScenarioSpec(clients=1, private=1, public=0, tasks=1, classes_per_task=1, alpha=1.0, seed=0)
    with pytest.raises(ScenarioError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        build_scenario(spec, train, np.array([0]), num_classes=num_classes)


def test_save_load_round_trip(small, tmp_path):
    _, train, test, sc = small
    path = tmp_path / "sub" / "scenario.json"
    sc.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["scenario.json"], "temporary file left behind"
    loaded = Scenario.load(path)
    assert loaded == sc and loaded.to_json() == path.read_text() == sc.to_json()
    assert loaded.client_tasks == sc.client_tasks and loaded.public_classes == sc.public_classes
    for a, b in zip(loaded.train_indices, sc.train_indices):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
            assert x.dtype == np.int64
    assert json.loads(path.read_text())["hash"] == sc.hash and len(sc.hash) == 64
    loaded.check_labels(train, test)
    with pytest.raises(ScenarioError, match="built for other labels"):
        loaded.check_labels(train[::-1], test)


@pytest.mark.parametrize("edit", ["index", "spec", "hash_removed"])
def test_tampered_json_fails_to_load(small, edit):
    payload = json.loads(small[3].to_json())
    if edit == "index":
        payload["clients"][0]["tasks"][0]["train"][0] += 1
    elif edit == "spec":
        payload["spec"]["alpha"] = 100.0
    else:
        del payload["hash"]
    with pytest.raises(ScenarioError, match="hash mismatch.*edited or corrupted"):
        Scenario.from_json(json.dumps(payload))


def test_not_a_scenario_file():
    with pytest.raises(ScenarioError, match="invalid JSON"):
        Scenario.from_json("{not json")
    with pytest.raises(ScenarioError, match="not a scenario file"):
        Scenario.from_json('{"a": 1}')


def test_scenario_table(small):
    spec, _, _, sc = small
    names = [f"cls{k}" for k in range(30)]
    text = scenario_table(sc, class_names=names)
    assert sc.short_hash in text
    lines = text.splitlines()
    rows = [ln.split() for ln in lines if ln.split() and ln.split()[0].isdigit()]
    assert len(rows) == spec.clients * (spec.tasks + 1)
    for c in range(spec.clients):
        total = next(r for r in rows if r[0] == str(c) and r[1] == "total")
        assert total[2:6] == [str(spec.private), str(spec.public),
                              str(sum(map(len, sc.train_indices[c]))), str(sum(map(len, sc.test_indices[c])))]
    first = next(r for r in rows if r[:2] == ["0", "0"])
    assert first[6:] == [f"{k}:cls{k}" for k in sc.client_tasks[0][0]]


# -- the server-held split -------------------------------------------------------------------------------

def test_server_held_split_is_reserved_before_the_public_split(small, tmp_path):
    import dataclasses

    spec, train, test, plain = small
    sc = build_scenario(dataclasses.replace(spec, server_per_class=3), train, test)
    server = sc.server_indices
    assert len(server) == 3 * spec.public and list(server) == sorted(server)
    assert np.bincount(train[server], minlength=30)[sc.public_classes].tolist() == [3] * spec.public
    assert set(train[server]) == set(sc.public_classes)  # public classes only
    held = np.concatenate([ix for client in sc.train_indices for ix in client])
    assert not np.isin(server, held).any()  # no client holds a server sample
    # every other public sample still goes to some client, and class choice and task orders do not move
    public_total = np.isin(train, sc.public_classes).sum()
    assert np.isin(train[held], sc.public_classes).sum() == public_total - len(server)
    assert sc.client_tasks == plain.client_tasks and sc.public_classes == plain.public_classes
    # saved, hashed and loaded back; a scenario without one keeps its hash and has no "server" key
    sc.save(tmp_path / "s.json")
    back = Scenario.load(tmp_path / "s.json")
    assert np.array_equal(back.server_indices, server) and back.hash == sc.hash != plain.hash
    assert "server" not in json.loads(plain.to_json()) and "server_per_class" not in plain.spec.to_dict()
    edited = json.loads(sc.to_json())
    edited["server"][0] += 1
    with pytest.raises(ScenarioError, match="hash mismatch"):
        Scenario.from_json(json.dumps(edited))


def test_server_split_larger_than_a_public_class_is_a_clear_error(small):
    import dataclasses

    spec, train, test, _ = small
    with pytest.raises(ScenarioError, match="lower server_per_class"):
        build_scenario(dataclasses.replace(spec, server_per_class=1000), train, test)
    with pytest.raises(ScenarioError, match="public is 0"):
        dataclasses.replace(spec, public=0, private=10, server_per_class=2).validate()
