import numpy as np
import pytest

from cotune.algorithms.fedmkt.selection import TeacherView, build_targets, select_teachers
from cotune.lm.logits import GoldTargets
from cotune.wire.topk_types import SampleLogits


def test_dualmince_picks_best_sender_only_when_it_beats_the_receiver():
    own = np.array([1.0, 1.0, 1.0, 0.1])
    teachers = np.array([[0.5, 2.0, 1.5, 0.2],
                         [0.7, 0.9, 1.0, 0.3]])
    assert select_teachers(own, teachers).tolist() == [0, 1, -1, -1]  # tie with own loss: no KD


def test_fate_self_falls_back_to_self_distillation():
    own = np.array([1.0, 0.1])
    teachers = np.array([[0.5, 0.2]])
    assert select_teachers(own, teachers, selection="fate_self").tolist() == [0, -2]


def test_unknown_selection_is_rejected():
    with pytest.raises(ValueError, match="dualmince"):
        select_teachers(np.zeros(1), np.zeros((1, 1)), selection="best")


def _sample(positions, ids, probs, loss):
    return SampleLogits(positions=np.array(positions, np.int32), ids=np.array(ids, np.int32),
                        logprobs=np.log(np.array(probs, np.float32)), loss_bpb=loss)


def _gold(positions, ids, nll, response_bytes=1):
    return GoldTargets(positions=np.array(positions, np.int32), ids=np.array(ids, np.int64),
                       nll=np.array(nll, np.float64), response_bytes=response_bytes)


class _Alignment:
    def __init__(self, pairs):
        self._pairs = pairs

    def pairs(self, i):
        src, dst = self._pairs[i]
        return np.array(src, np.int32), np.array(dst, np.int32)


def test_targets_follow_alignment_and_vocab_map():
    teacher = _sample([3, 4, 5], [[0, 1], [2, 3], [1, 0]], [[0.6, 0.2], [0.5, 0.5], [0.7, 0.1]], loss=0.5)
    own = _sample([2, 3], [[0, 1], [1, 0]], [[0.5, 0.5], [0.5, 0.5]], loss=1.0)
    vocab_map = np.array([7, 7, 8, 9], np.int32)  # teacher ids 0 and 1 collapse onto receiver id 7
    view = TeacherView("llm", [teacher], vocab_map, _Alignment({0: ([3, 5], [2, 3])}))
    # the receiver's gold is 7 at both positions: the teacher gives it 0.6 + 0.2 = 0.8, the receiver itself e^-2
    targets, summary = build_targets([own], [_gold([2, 3], [7, 7], [2.0, 2.0])], [view], vocab_size=10)
    t = targets[0]
    assert t.positions.tolist() == [2, 3]
    assert t.ids[0, 0] == 7 and t.probs[0, 0] == pytest.approx(1.0)  # 0.6 + 0.2 summed, renormalised
    assert summary["kd_from_llm"] == 1 and summary["kd_targets"] == 1
    assert summary["teacher_bpb_llm"] == pytest.approx(-2 * np.log(0.8) / np.log(2), rel=1e-5)


def test_no_kd_when_receiver_is_better_and_public_sets_must_match():
    teacher = _sample([1], [[0]], [[0.9]], loss=0.0)  # claims a perfect loss, but puts 0.9 on a wrong token
    own = _sample([1], [[0]], [[0.9]], loss=1.0)
    gold = [_gold([1], [5], [1.0])]
    targets, summary = build_targets([own], gold, [TeacherView("c1", [teacher])], vocab_size=10)
    assert targets == [None] and summary["kd_none"] == 1
    with pytest.raises(ValueError, match="public set"):
        build_targets([own, own], gold * 2, [TeacherView("c1", [teacher])], vocab_size=10)


def test_skip_span_mismatch_keeps_only_same_span_pairs():
    from cotune.align.seqalign import SequenceAlignment

    teacher = _sample([3, 4, 5], [[0, 1], [2, 3], [1, 0]], [[0.6, 0.2], [0.5, 0.5], [0.7, 0.1]], loss=0.5)
    align = SequenceAlignment(sample_offsets=np.array([0, 2], np.int64), src_pos=np.array([3, 5], np.int32),
                              dst_pos=np.array([2, 3], np.int32), src_hash="", dst_hash="", public_set_hash="",
                              method="offsets", same_span=np.array([0, 1], np.uint8))
    vocab_map = np.array([7, 7, 8, 9], np.int32)
    every = TeacherView("llm", [teacher], vocab_map, align).target(0, np.array([2, 3]))
    same = TeacherView("llm", [teacher], vocab_map, align, same_span_only=True).target(0, np.array([2, 3]))
    assert every.positions.tolist() == [2, 3] and same.positions.tolist() == [3]
    assert same.ids[0].tolist() == every.ids[1].tolist()  # the pair (5, 3): teacher row 5's distribution
