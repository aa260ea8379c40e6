"""Remembered answers and labels sent later: the bounded map (count, age with an injected clock,
label sets, bytes per entry), and the `feedback`-by-id action through a real `Service` (its 4xx
answers, the counter, GDA learning from a labelled answer)."""

from __future__ import annotations

import gc
import tracemalloc

import pytest
import torch

from tta.engine import Engine
from tta.errors import BadRequest
from tta.metrics import ServingMetrics, sample_values
from tta.serving import codec
from tta.serving.admin import AdminAuth
from tta.serving.answers import AlreadyLabelled, AnswerGone, AnswerMemory, AnswerNotFound
from tta.serving.codec import ModelInfo, OipInfer, Predict
from tta.serving.service import Service
from tta.text import LabelSet

LABELS = ["cat", "dog", "car", "rocket", "cup"]
ADMIN = {"x-tta-admin-token": "t"}

# What one remembered answer may cost (64-bit CPython; 273 B measured on 3.11), measured below with tracemalloc:
# the 37-character id, the slotted entry, its float time and the ordered-dict node.
MAX_ENTRY_BYTES = 400


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def memory(max_entries: int = 4, ttl_s: float = 100.0, max_label_sets: int = 2, worker: str = "0000abcd",
           clock: Clock | None = None) -> AnswerMemory:
    return AnswerMemory(LABELS, max_entries=max_entries, ttl_s=ttl_s, max_label_sets=max_label_sets,
                        clock=clock or Clock(), worker=worker)


def code_of(exc: pytest.ExceptionInfo) -> tuple[int, str]:
    failure = codec.failure(exc.value)
    return failure.status, failure.code


# --- the map -------------------------------------------------------------------------------------
def test_label_returns_the_class_index_once() -> None:
    answers = memory()
    answer_id = answers.remember("tda", "cat", "dog")
    answer, index, names = answers.label(answer_id, " dog ")
    assert (answer.method, answer.zeroshot, answer.served, index, names[index]) == ("tda", 0, 1, 1, "dog")
    with pytest.raises(AlreadyLabelled) as again:
        answers.label(answer_id, "dog")
    assert code_of(again) == (409, "already_labelled")


def test_full_map_evicts_the_oldest_answer_first() -> None:
    clock = Clock()
    answers = memory(max_entries=3, clock=clock)
    ids = []
    for _ in range(5):
        ids.append(answers.remember("zeroshot", "cat", "cat"))
        clock.now += 1.0
    assert len(answers) == 3 and answers.evicted == 2
    for old in ids[:2]:
        with pytest.raises(AnswerGone) as gone:
            answers.label(old, "cat")
        assert code_of(gone) == (410, "answer_evicted") and "at most 3 answers" in str(gone.value)
    for kept in ids[2:]:
        assert answers.label(kept, "cat")[1] == 0


def test_answers_expire_after_the_ttl_and_say_so() -> None:
    clock = Clock()
    answers = memory(ttl_s=100.0, clock=clock)
    early = answers.remember("tda", "cat", "cat")
    clock.now += 60.0
    late = answers.remember("tda", "cat", "dog")
    clock.now += 40.0  # early is exactly 100 s old: still remembered
    assert answers.label(early, "cat")[1] == 0
    clock.now += 0.5  # now 100.5 s
    with pytest.raises(AnswerGone) as gone:
        answers.label(early, "cat")
    assert code_of(gone) == (410, "answer_expired") and "100 s" in str(gone.value)
    assert len(answers) == 1 and answers.expired == 1  # expiry dropped it; the young one stays
    assert answers.label(late, "dog")[1] == 1


def test_an_id_of_another_worker_is_a_404_that_says_so() -> None:
    clock = Clock()
    mine, other = memory(worker="0000aaaa", clock=clock), memory(worker="0000bbbb", clock=clock)
    answer_id = other.remember("tda", "cat", "cat")
    with pytest.raises(AnswerNotFound) as elsewhere:
        mine.label(answer_id, "cat")
    assert code_of(elsewhere) == (404, "answer_elsewhere") and "another worker" in str(elsewhere.value)
    assert other.label(answer_id, "cat")[1] == 0  # the refusal changed nothing: resending works
    old = other.remember("tda", "cat", "cat")
    clock.now += 1000.0
    with pytest.raises(AnswerGone) as gone:  # too old for any worker: expired, wherever it was answered
        mine.label(old, "cat")
    assert code_of(gone) == (410, "answer_expired")


@pytest.mark.parametrize("answer_id", ["nope", "0000abcd-zz-0123456789abcdef", "", "x" * 64,
                                       "0000abcd-fffffffffff-0123456789abcdef"])  # malformed, or from the future
def test_unknown_ids_are_a_404(answer_id: str) -> None:
    with pytest.raises(AnswerNotFound) as unknown:
        memory().label(answer_id, "cat")
    assert code_of(unknown) == (404, "answer_unknown")


def test_a_label_outside_the_answers_label_set_is_a_400_and_changes_nothing() -> None:
    answers = memory()
    default = answers.remember("zeroshot", "cat", "cat")
    custom = answers.remember("zeroshot", "fox", "owl", labels=("fox", "owl"))
    for answer_id, label in ((default, "fox"), (custom, "cat")):
        with pytest.raises(BadRequest) as bad:
            answers.label(answer_id, label)
        assert code_of(bad) == (400, "unknown_label")
    assert answers.label(custom, "owl")[1:] == (1, ("fox", "owl"))
    assert answers.label(default, "cat")[1] == 0


def test_request_label_sets_are_shared_counted_and_bounded() -> None:
    answers = memory(max_entries=10, max_label_sets=2)
    a1 = answers.remember("zeroshot", "a", "b", labels=("a", "b"))
    answers.remember("zeroshot", "a", "a", labels=("a", "b"))  # the same set: stored once
    c = answers.remember("zeroshot", "c", "d", labels=("c", "d"))
    assert answers.summary()["label_sets"] == 2
    e = answers.remember("zeroshot", "e", "e", labels=("e",))  # a third set evicts the oldest answers until one frees
    assert answers.summary()["label_sets"] == 2 and len(answers) == 2
    with pytest.raises(AnswerGone):
        answers.label(a1, "a")
    assert answers.label(c, "d")[1] == 1 and answers.label(e, "e")[1] == 0


def test_max_entries_zero_remembers_nothing() -> None:
    answers = memory(max_entries=0)
    answer_id = answers.remember("tda", "cat", "cat")
    assert len(answers) == 0
    with pytest.raises(AnswerGone):
        answers.label(answer_id, "cat")


def _bytes_per_entry(feature: bytes | None, n: int = 1000) -> float:
    answers = AnswerMemory([f"class {i}" for i in range(1000)], max_entries=n)
    methods = ("tda", "gda")
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(n):  # class indices above 256 (no cached small ints): the worst case
        answers.remember(methods[i % 2], f"class {500 + i % 400}", f"class {900 - i % 300}",
                         feature=None if feature is None else bytes(bytearray(feature)))  # a new object each
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return used / n


def test_memory_per_entry_is_bounded() -> None:
    plain = _bytes_per_entry(None)
    assert 100 < plain <= MAX_ENTRY_BYTES, plain
    d = 512  # ViT-B/16's feature: GDA answers add its float32 bytes (+ the bytes object's 33)
    with_feature = _bytes_per_entry(bytes(4 * d))
    assert with_feature - plain == pytest.approx(4 * d + 33, abs=16), (plain, with_feature)


# --- the action, through a real Service ------------------------------------------------------------
def _service(clip, **memory_options) -> Service:
    engine = Engine(clip, LabelSet.create(LABELS), default_method="tda")
    answers = AnswerMemory(LABELS, **memory_options) if memory_options else None
    return Service(engine, ServingMetrics(), ModelInfo("m", "1.0", "tiny-random"), admin=AdminAuth(token="t"),
                   answers=answers)


def _label(service: Service, body: dict, headers: dict | None = ADMIN):
    return service.handle(body, headers)


def _count(service: Service, method: str, zeroshot: str, served: str) -> float:
    return sum(sample_values(service.metrics.render().decode(), "tta_labelled_answers_total",
                             {"model": "m", "method": method, "zeroshot_correct": zeroshot, "served_correct": served}))


def test_every_answer_carries_an_id_json_and_oip(tiny_clip, sample_images) -> None:
    service = _service(tiny_clip)
    one = service.handle({"image": _b64(sample_images["coffee"]), "method": "zeroshot"})
    assert one.status == 200 and len(one.body["id"]) == 37
    replies = service.run_batch([OipInfer([Predict(sample_images["coffee"], method="zeroshot"),
                                           Predict(sample_images["rocket"], method="zeroshot")])])
    ids = replies[0].body["parameters"]["answer_ids"].split(",")
    assert len(ids) == 2 and len(set(ids) | {one.body["id"]}) == 3
    assert len(service.answers) == 3


def test_labels_count_per_method_whether_zeroshot_and_served_were_right(tiny_clip, sample_images) -> None:
    service = _service(tiny_clip)
    answer = service.handle({"image": _b64(sample_images["chelsea"]), "method": "tda"}).body
    wrong = next(label for label in LABELS if label not in (answer["label"], answer["zeroshot_label"]))
    reply = _label(service, {"action": "feedback", "id": answer["id"], "label": answer["label"]})
    assert reply.status == 200, reply.body
    feedback = reply.body["feedback"]
    assert reply.body["method"] == "tda" and feedback["served_correct"] is True
    assert feedback["zeroshot_correct"] is (answer["zeroshot_label"] == answer["label"])
    zs = "true" if feedback["zeroshot_correct"] else "false"
    assert _count(service, "tda", zs, "true") == 1
    second = service.handle({"image": _b64(sample_images["rocket"]), "method": "zeroshot"}).body
    assert _label(service, {"action": "feedback", "id": second["id"], "label": wrong}).status == 200
    assert _count(service, "zeroshot", "false", "false") == 1
    assert _count(service, "zeroshot", "true", "true") == 0  # declared zeros: the series exist from the start


def test_label_action_refusals(tiny_clip, sample_images) -> None:
    service = _service(tiny_clip)
    answer = service.handle({"image": _b64(sample_images["chelsea"]), "method": "zeroshot"}).body
    cases = [
        ({"action": "feedback", "id": answer["id"], "label": "cat"}, {}, 401, "unauthorized"),
        ({"action": "feedback", "id": answer["id"], "label": "cat"}, {"x-tta-admin-token": "no"}, 403, "forbidden"),
        ({"action": "feedback", "id": answer["id"], "label": "giraffe"}, ADMIN, 400, "unknown_label"),
        ({"action": "feedback", "id": answer["id"]}, ADMIN, 400, "bad_labels"),
        ({"action": "feedback", "id": 7, "label": "cat"}, ADMIN, 400, "bad_id"),
        ({"action": "feedback", "id": answer["id"], "label": "cat", "image": "AAAA"}, ADMIN, 400, "bad_json"),
        ({"action": "feedback", "id": answer["id"], "label": "cat", "method": "tda"}, ADMIN, 400, "unknown_method"),
        ({"action": "feedback", "id": "nope", "label": "cat"}, ADMIN, 404, "answer_unknown"),
    ]
    for body, headers, status, error in cases:
        reply = _label(service, body, headers)
        assert (reply.status, reply.body["code"]) == (status, error), (body, reply.body)
        assert reply.body["error"]
    assert sum(_count(service, "zeroshot", z, s) for z in ("true", "false") for s in ("true", "false")) == 0
    assert _label(service, {"action": "feedback", "id": answer["id"], "label": "cat"}).status == 200
    again = _label(service, {"action": "feedback", "id": answer["id"], "label": "cat"})
    assert (again.status, again.body["code"]) == (409, "already_labelled")


def test_expired_and_evicted_ids_are_410(tiny_clip, sample_images) -> None:
    clock = Clock()
    service = _service(tiny_clip, max_entries=1, ttl_s=60.0, clock=clock)
    first = service.handle({"image": _b64(sample_images["chelsea"]), "method": "zeroshot"}).body["id"]
    second = service.handle({"image": _b64(sample_images["coffee"]), "method": "zeroshot"}).body["id"]
    evicted = _label(service, {"action": "feedback", "id": first, "label": "cat"})
    assert (evicted.status, evicted.body["code"]) == (410, "answer_evicted")
    clock.now += 61.0
    expired = _label(service, {"action": "feedback", "id": second, "label": "cat"})
    assert (expired.status, expired.body["code"]) == (410, "answer_expired")


def test_a_label_for_a_gda_answer_joins_its_support_set(tiny_clip, sample_images) -> None:
    """The answer's remembered feature is the one `feedback` with the image would add (one view)."""
    by_id, by_image = _service(tiny_clip), _service(tiny_clip)
    image = sample_images["chelsea"]
    answer = by_id.handle({"image": _b64(image), "method": "gda"}).body
    assert answer["fallback"]  # nothing learned yet: zero-shot
    reply = _label(by_id, {"action": "feedback", "id": answer["id"], "label": "dog"})
    assert reply.status == 200, reply.body
    assert reply.body["feedback"]["learned"]["support_total"] == 1
    sent = _label(by_image, {"action": "feedback", "method": "gda", "label": "dog", "image": _b64(image)})
    assert sent.status == 200 and sent.body["feedback"]["support_total"] == 1  # the image form still works
    got = by_id.engine.method("gda").support.stacked()[0]
    want = by_image.engine.method("gda").support.stacked()[0]
    assert torch.allclose(got, want, atol=1e-5)  # same encoder pass on the same view, float32
    tda = by_id.handle({"image": _b64(image), "method": "tda"}).body
    assert "learned" not in _label(by_id, {"action": "feedback", "id": tda["id"], "label": "dog"}).body["feedback"]


def _b64(image: torch.Tensor) -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()
