"""`laplacefim serve` as a real server in a subprocess, queried over HTTP: results equal
la.predict, bad requests get their 4xx and never hurt the next one, concurrent clients get
their own answers, a failing batch fails only its culprit, shutdown finishes in-flight work."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers import generator
from serving_models import POISON, SLOW, make_guarded
from torch import nn

from laplacefim import Laplace, __version__
from laplacefim.serving import Predictor

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

MODELS = str(Path(__file__).with_name("serving_models.py"))
MAX_INPUTS = 100
MAX_BODY_MB = 0.05


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(directory: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "laplacefim",
        "serve",
        "--model",
        f"{MODELS}:make_guarded",
        "--weights",
        str(directory / "w.pt"),
        "--port",
        str(port),
        "--threads",
        "1",
        *extra,
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not come up in 120 s")


# uvicorn finishes its graceful shutdown, then re-raises the signal it was stopped by
STOPPED = (0, -signal.SIGTERM)


def _stop(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    directory = tmp_path_factory.mktemp("served")
    g = generator(0)
    x = torch.randn(400, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    model = make_guarded()
    optimiser = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(x[:300]), y[:300]).backward()
        optimiser.step()
    la = Laplace(model, "classification", subset="all", structure="kron")
    la.fit([(x[:300], y[:300])])
    la.tune_prior()
    la.calibrate_abstention([(x[300:], y[300:])], target_coverage=0.9)
    torch.save(model.state_dict(), directory / "w.pt")
    la.save(directory / "la.pt")
    process, url = _start(
        directory,
        "--laplace",
        str(directory / "la.pt"),
        "--max-wait-ms",
        "20",
        "--max-batch",
        "32",
        "--max-inputs",
        str(MAX_INPUTS),
        "--max-body-mb",
        str(MAX_BODY_MB),
    )
    with httpx.Client(base_url=url, timeout=60) as client:
        yield client, la, x, directory
    assert _stop(process) in STOPPED


def _expected(la: Laplace, x: torch.Tensor) -> list[dict]:
    return [r.to_dict() for r in Predictor(la.model, la).predict(x)]


def _assert_results(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a["prediction"] == b["prediction"]
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-6)
        assert a["uncertainty"] == pytest.approx(b["uncertainty"], abs=1e-5)
        assert a["ood_score"] == pytest.approx(b["ood_score"], abs=1e-5)
        assert a["abstain"] == b["abstain"]


def test_results_equal_la_predict(served):
    client, la, x, _ = served
    response = client.post("/v1/predict", json={"inputs": x[300:340].tolist()})
    assert response.status_code == 200
    results = response.json()["results"]
    probs = torch.tensor([r["probabilities"] for r in results])
    assert torch.allclose(probs, la.predict(x[300:340]).probs, atol=1e-6, rtol=0)
    _assert_results(results, _expected(la, x[300:340]))
    threshold = la.abstention.threshold
    assert [r["abstain"] for r in results] == (probs.amax(-1) < threshold).tolist()


def test_metadata_and_schema(served):
    client, la, _, _ = served
    meta = client.get("/v1/metadata").json()
    assert meta["version"] == __version__
    assert meta["likelihood"] == "classification"
    posterior = meta["posterior"]
    assert posterior["structure"] == "kron"
    assert posterior["n_params"] == la.n_params
    assert posterior["prior_precision"] == pytest.approx(float(la.prior_precision))
    assert meta["abstention"]["threshold"] == pytest.approx(la.abstention.threshold)
    assert meta["abstention"]["target_coverage"] == 0.9
    assert meta["server"]["max_batch"] == 32
    assert meta["input_shape"] == [8]
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert "inputs" in body["schema"]["properties"]
    assert client.get("/health").json() == {"status": "ok"}


BAD_REQUESTS = [
    ("wrong shape", json.dumps({"inputs": [[0.0] * 7]}), 422, "shape"),
    ("strings", json.dumps({"inputs": [["a"] * 8]}), 422, "numbers"),
    ("booleans", json.dumps({"inputs": [[True] * 8]}), 422, "booleans"),
    ("NaN", '{"inputs": [[NaN, 0, 0, 0, 0, 0, 0, 0]]}', 422, "NaN"),
    ("infinity", '{"inputs": [[Infinity, 0, 0, 0, 0, 0, 0, 0]]}', 422, "infinite"),
    ("empty", json.dumps({"inputs": []}), 422, "empty"),
    ("ragged", json.dumps({"inputs": [[0.0] * 8, [0.0] * 6]}), 422, "one shape"),
    ("malformed", '{"inputs": [[0, 1]', 400, "not valid JSON"),
    ("not an object", "[1, 2]", 422, "body"),
    ("unknown field", json.dumps({"inputs": [[0.0] * 8], "extra": 1}), 422, "unknown field"),
    ("missing inputs", json.dumps({"data": [[0.0] * 8]}), 422, "inputs"),
    ("too many", json.dumps({"inputs": [[0.0] * 8] * (MAX_INPUTS + 1)}), 413, "limit"),
    ("oversized", json.dumps({"inputs": [[0.0] * 8] * 90, "pad": "x" * 60000}), 413, "limit"),
]


@pytest.mark.parametrize(
    ("what", "body", "status", "says"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_requests_get_a_4xx_and_the_next_request_succeeds(served, what, body, status, says):
    client, la, x, _ = served
    response = client.post(
        "/v1/predict", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    error = response.json()
    assert list(error) == ["error"] and "\n" not in error["error"]
    assert says.lower() in error["error"].lower(), error["error"]
    good = client.post("/v1/predict", json={"inputs": x[:2].tolist()})
    assert good.status_code == 200
    _assert_results(good.json()["results"], _expected(la, x[:2]))


def test_routes_that_do_not_exist(served):
    client, _, _, _ = served
    assert client.get("/v1/predict").status_code == 405
    missing = client.get("/v2/nothing")
    assert missing.status_code == 404 and list(missing.json()) == ["error"]


def test_concurrent_clients_get_their_own_answers(served):
    client, la, x, _ = served
    before = client.get("/v1/stats").json()

    def ask(index: int) -> tuple[int, list[dict]]:
        rows = x[index * 3 : index * 3 + 1 + index % 3]
        with httpx.Client(base_url=str(client.base_url), timeout=60) as own:
            response = own.post("/v1/predict", json={"inputs": rows.tolist()})
        assert response.status_code == 200, response.text
        return index, response.json()["results"]

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, range(32)))
    for index, results in answers:
        _assert_results(results, _expected(la, x[index * 3 : index * 3 + 1 + index % 3]))
    after = client.get("/v1/stats").json()
    grown = {
        int(k): v - before["requests_per_batch"].get(k, 0)
        for k, v in after["requests_per_batch"].items()
    }
    assert max(k for k, v in grown.items() if v > 0) > 1  # some requests were coalesced
    sizes = {
        int(k): v - before["inputs_per_batch"].get(k, 0)
        for k, v in after["inputs_per_batch"].items()
    }
    assert max(k for k, v in sizes.items() if v > 0) <= 32  # --max-batch


def test_a_failing_batch_fails_only_its_culprit(served):
    client, la, x, _ = served
    poison = x[:1].clone()
    poison[0, 0] = POISON

    def ask(rows: torch.Tensor) -> httpx.Response:
        with httpx.Client(base_url=str(client.base_url), timeout=60) as own:
            return own.post("/v1/predict", json={"inputs": rows.tolist()})

    jobs = [poison] + [x[i : i + 2] for i in range(0, 30, 2)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(ask, jobs))
    assert responses[0].status_code == 500
    assert "poisoned input" in responses[0].json()["error"]
    for rows, response in zip(jobs[1:], responses[1:], strict=True):
        assert response.status_code == 200, response.text
        _assert_results(response.json()["results"], _expected(la, rows))
    assert client.get("/health").status_code == 200


def test_map_only_server_and_graceful_shutdown(served):
    _, _, x, directory = served
    process, url = _start(directory, "--likelihood", "classification")
    slow = x[:1].clone()
    slow[0, 0] = SLOW
    model = make_guarded()
    model.load_state_dict(torch.load(directory / "w.pt"))
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            httpx.post, url + "/v1/predict", json={"inputs": slow.tolist()}, timeout=60
        )
        time.sleep(0.5)  # the request is inside the model's forward now
        process.send_signal(signal.SIGTERM)
        response = pending.result()
    assert response.status_code == 200
    (result,) = response.json()["results"]
    with torch.no_grad():
        expected = model.net(slow).softmax(-1)[0]
    assert result["probabilities"] == pytest.approx(expected.tolist(), abs=1e-6)
    assert result["uncertainty"]["mutual_information"] == 0.0
    assert process.wait(timeout=30) in STOPPED


def test_serve_command_refuses_bad_options(served, capsys):
    from laplacefim.cli import main

    _, _, _, directory = served
    base = ["serve", "--model", f"{MODELS}:make_guarded", "--weights", str(directory / "w.pt")]
    assert main(base) == 1
    assert "pass --likelihood" in capsys.readouterr().err
    assert main([*base, "--laplace", str(directory / "la.pt"), "--max-batch", "0"]) == 1
    assert "--max-batch must be >= 1" in capsys.readouterr().err
    assert main([*base, "--laplace", str(directory / "missing.pt")]) == 1
    assert "file not found" in capsys.readouterr().err
    state = torch.load(directory / "w.pt")
    state["net.0.weight"] = state["net.0.weight"] + 0.01  # not the weights it was fitted at
    torch.save(state, directory / "other.pt")
    other = ["serve", "--model", f"{MODELS}:make_guarded", "--weights", str(directory / "other.pt")]
    assert main([*other, "--laplace", str(directory / "la.pt")]) == 1
    assert "differ from the fitted mean" in capsys.readouterr().err
