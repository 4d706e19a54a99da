"""Summary metrics against hand computations on small accuracy matrices."""

from __future__ import annotations

import numpy as np
import pytest

from fcl_bench.metrics import acc_per_task, accuracy_matrix, summarise

NAN = np.nan

# 2 clients x 3 tasks. correct[c, t, i]: correct answers of client c after task t on its task i's test set.
CORRECT = np.array([
    [[8, NAN, NAN],
     [6, 9, NAN],
     [4, 6, 15]],
    [[5, NAN, NAN],
     [5, 10, NAN],
     [2, 10, 9]],
])
TOTAL = np.array([[10, 10, 20],
                  [10, 20, 10]])

# the same numbers written out as accuracies a[c, t, i]
A = [
    [[0.8], [0.6, 0.9], [0.4, 0.6, 0.75]],
    [[0.5], [0.5, 0.5], [0.2, 0.5, 0.9]],
]


def test_accuracy_matrix_divides_by_the_task_test_size_and_blanks_the_upper_triangle():
    a = accuracy_matrix(CORRECT, TOTAL)
    for c in range(2):
        for t in range(3):
            assert a[c, t, : t + 1] == pytest.approx(A[c][t])
            assert np.isnan(a[c, t, t + 1:]).all()


def test_acc_is_sample_weighted_over_seen_tasks_then_averaged_over_clients():
    # client 0 after task 1: (6 + 9) / (10 + 10); after task 2: (4 + 6 + 15) / 40
    # client 1 after task 1: (5 + 10) / (10 + 20); after task 2: (2 + 10 + 9) / 40
    per_client = np.array([[0.8, 15 / 20, 25 / 40], [0.5, 15 / 30, 21 / 40]])
    assert acc_per_task(CORRECT, TOTAL) == pytest.approx(per_client)
    s = summarise(CORRECT, TOTAL)
    assert s["acc"] == pytest.approx(per_client.mean(0).tolist())
    assert np.array(s["per_client"]["acc"]) == pytest.approx(per_client)
    assert s["final_acc"] == pytest.approx((25 / 40 + 21 / 40) / 2)
    assert s["avg_incremental_acc"] == pytest.approx(per_client.mean(0).mean())
    assert s["per_client"]["avg_incremental_acc"] == pytest.approx(per_client.mean(1).tolist())
    assert s["per_client"]["final_acc"] == pytest.approx([25 / 40, 21 / 40])
    # sample weighting matters here: client 1's task-mean after task 1 is 0.5 as well, but after task 2
    # (0.2 + 0.5 + 0.9) / 3 = 0.5333 differs from the sample-weighted 21/40 = 0.525
    assert s["acc"][2] != pytest.approx(s["task_mean_acc"][2])


def test_task_mean_acc_is_the_unweighted_mean_over_seen_tasks():
    per_client = np.array([[np.mean(A[c][t]) for t in range(3)] for c in range(2)])
    s = summarise(CORRECT, TOTAL)
    assert s["task_mean_acc"] == pytest.approx(per_client.mean(0).tolist())
    assert np.array(s["per_client"]["task_mean_acc"]) == pytest.approx(per_client)


def test_current_task_acc_is_the_diagonal_averaged_over_clients():
    # after task t, on task t's test set alone: client 0 0.8, 0.9, 0.75; client 1 0.5, 0.5, 0.9
    per_client = [[0.8, 0.9, 0.75], [0.5, 0.5, 0.9]]
    s = summarise(CORRECT, TOTAL)
    assert np.array(s["per_client"]["current_task_acc"]) == pytest.approx(np.array(per_client))
    assert s["current_task_acc"] == pytest.approx([0.65, 0.7, 0.825])
    assert s["current_task_acc"][2] != pytest.approx(s["acc"][2])  # not the all-tasks-so-far reading


def test_forgetting_is_chaudhry_max_over_earlier_tasks_minus_final():
    # client 0: task 0 max(0.8, 0.6) - 0.4 = 0.4; task 1: 0.9 - 0.6 = 0.3 -> 0.35
    # client 1: task 0 max(0.5, 0.5) - 0.2 = 0.3; task 1: 0.5 - 0.5 = 0.0 -> 0.15
    s = summarise(CORRECT, TOTAL)
    assert s["per_client"]["forgetting"] == pytest.approx([0.35, 0.15])
    assert s["forgetting"] == pytest.approx(0.25)


def test_forgetting_takes_the_max_not_the_first_accuracy():
    # accuracy on task 0 rises after task 1 (0.2 -> 0.9), then drops to 0.5: forgetting 0.4, not -0.3
    correct = np.array([[[2, NAN, NAN], [9, 5, NAN], [5, 5, 5]]])
    total = np.full((1, 3), 10)
    s = summarise(correct, total)
    assert s["per_client"]["forgetting"][0] == pytest.approx(np.mean([0.9 - 0.5, 0.5 - 0.5]))


def test_bwt_is_final_minus_just_learned_accuracy():
    # client 0: (0.4 - 0.8 + 0.6 - 0.9) / 2 = -0.35; client 1: (0.2 - 0.5 + 0.5 - 0.5) / 2 = -0.15
    s = summarise(CORRECT, TOTAL)
    assert s["per_client"]["bwt"] == pytest.approx([-0.35, -0.15])
    assert s["bwt"] == pytest.approx(-0.25)


def test_a_single_task_has_no_forgetting_and_no_bwt():
    s = summarise(np.array([[[3.0]], [[7.0]]]), np.array([[10], [10]]))
    assert s["forgetting"] == 0.0 and s["bwt"] == 0.0
    assert s["final_acc"] == pytest.approx(0.5) and s["acc"] == pytest.approx([0.5])


def test_upper_triangle_values_are_ignored():
    # the harness passes zeros above the diagonal (nan_to_num); they must not change anything
    filled = np.nan_to_num(CORRECT, nan=123.0)
    a, b = summarise(CORRECT, TOTAL), summarise(filled, TOTAL)
    for key in ("acc", "task_mean_acc", "forgetting", "bwt", "accuracy_matrix"):
        assert a[key] == b[key]
    assert a["accuracy_matrix"][0][0] == [pytest.approx(0.8), None, None]


def test_bad_shapes_are_an_error():
    with pytest.raises(ValueError, match="correct must be"):
        accuracy_matrix(np.zeros((2, 3, 2)), np.ones((2, 3)))
