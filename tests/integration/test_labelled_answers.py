"""Labels sent later for earlier answers, through the session's real TorchServe: every answer form
carries an id, the label action is privileged and refuses what it cannot count with its 4xx, and
`tta_labelled_answers_total` on the tta exporter counts exactly the labels sent (differences
between two scrapes: the shared server may have served other tests before)."""

from __future__ import annotations

import pytest
import requests

from tests.integration.conftest import LABELS, MODEL
from tests.integration.test_metrics import scrape, total
from tests.integration.test_server import b64, post_json
from tests.integration.torchserve import TorchServe

pytestmark = pytest.mark.server


def counts(server: TorchServe) -> dict:
    return scrape(f"http://127.0.0.1:{server.tta_metrics_port}/metrics")


def labelled(samples: dict, method: str, zeroshot: bool, served: bool) -> float:
    return total(samples, "tta_labelled_answers_total", model=MODEL, method=method,
                 zeroshot_correct=str(zeroshot).lower(), served_correct=str(served).lower())


def test_labels_for_earlier_answers_are_counted_per_method(server: TorchServe, photos: dict[str, bytes]) -> None:
    answers = {}
    for method, name in (("tda", "chelsea"), ("tda", "rocket"), ("zeroshot", "coffee")):
        reply = post_json(server, {"image": b64(photos[name]), "method": method})
        assert reply.status_code == 200, reply.text
        answers[(method, name)] = reply.json()
    raw = requests.post(server.predict_url, data=photos["astronaut"], headers=server.auth, timeout=60).json()
    assert raw["method"] == "zeroshot" and len(raw["id"]) == 37  # raw image answers carry one too
    ids = {a["id"] for a in answers.values()} | {raw["id"]}
    assert len(ids) == 4

    before = counts(server)
    expected: dict[tuple[str, bool, bool], int] = {}
    for (method, _), answer in answers.items():
        truth = answer["label"] if method == "tda" else next(x for x in LABELS if x != answer["label"])
        reply = post_json(server, {"action": "feedback", "id": answer["id"], "label": truth})
        assert reply.status_code == 200, reply.text
        body = reply.json()["feedback"]
        assert body["served_correct"] is (truth == answer["label"])
        assert body["zeroshot_correct"] is (truth == answer["zeroshot_label"])
        key = (method, body["zeroshot_correct"], body["served_correct"])
        expected[key] = expected.get(key, 0) + 1
    after = counts(server)
    for method in ("tda", "zeroshot"):
        for zeroshot in (True, False):
            for served in (True, False):
                got = labelled(after, method, zeroshot, served) - labelled(before, method, zeroshot, served)
                assert got == expected.get((method, zeroshot, served), 0), (method, zeroshot, served)
    actions = total(after, "tta_state_actions_total", model=MODEL, method="tda", action="feedback", outcome="ok")
    assert actions - total(before, "tta_state_actions_total", model=MODEL, method="tda", action="feedback",
                           outcome="ok") == 2


def test_label_refusals_through_torchserve(server: TorchServe, photos: dict[str, bytes]) -> None:
    answer = post_json(server, {"image": b64(photos["chelsea"]), "method": "zeroshot"}).json()
    worker, _, rest = answer["id"].partition("-")
    elsewhere = ("00000000" if worker != "00000000" else "11111111") + "-" + rest  # the id format of another worker
    before = counts(server)
    unauthenticated = requests.post(server.predict_url, json={"action": "feedback", "id": answer["id"], "label": "cat"},
                                    headers=server.auth, timeout=60)
    assert unauthenticated.status_code == 401
    for body, status, error in (
        ({"action": "feedback", "id": answer["id"], "label": "giraffe"}, 400, "unknown_label"),
        ({"action": "feedback", "id": "no-such-answer", "label": "cat"}, 404, "answer_unknown"),
        ({"action": "feedback", "id": elsewhere, "label": "cat"}, 404, "answer_elsewhere"),
    ):
        reply = post_json(server, body)
        assert (reply.status_code, reply.json()["code"]) == (status, error), reply.text
        assert reply.json()["error"]
    after = counts(server)
    assert sum(labelled(after, "zeroshot", z, s) - labelled(before, "zeroshot", z, s)
               for z in (True, False) for s in (True, False)) == 0  # refusals count nothing
    assert post_json(server, {"action": "feedback", "id": answer["id"], "label": "cat"}).status_code == 200
    again = post_json(server, {"action": "feedback", "id": answer["id"], "label": "cat"})
    assert (again.status_code, again.json()["code"]) == (409, "already_labelled")


def test_oip_answers_carry_ids_and_gda_learns_from_a_labelled_answer(server: TorchServe,
                                                                     photos: dict[str, bytes]) -> None:
    oip = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                       "data": [b64(photos["coffee"]), b64(photos["rocket"])]}], "parameters": {"method": "gda"}}
    reply = requests.post(f"{server.url}/v2/models/{MODEL}/infer", json=oip, headers=server.auth, timeout=120)
    assert reply.status_code == 200, reply.text
    ids = reply.json()["parameters"]["answer_ids"].split(",")
    assert len(ids) == 2
    try:
        assert post_json(server, {"action": "reset", "method": "gda"}).status_code == 200
        learned = post_json(server, {"action": "feedback", "id": ids[0], "label": "coffee cup"})
        assert learned.status_code == 200, learned.text
        assert learned.json()["method"] == "gda" and learned.json()["feedback"]["learned"]["support_total"] == 1
        sent = post_json(server, {"action": "feedback", "method": "gda", "label": "rocket",
                                  "image": b64(photos["rocket"])})  # the image form keeps working beside it
        assert sent.status_code == 200 and sent.json()["feedback"]["support_total"] == 2
    finally:
        post_json(server, {"action": "reset", "method": "gda"})
