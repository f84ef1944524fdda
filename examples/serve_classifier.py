"""Serve a digits classifier with uncertainty: fit → calibrate abstention → save → serve →
query (Python and curl) → export a program that plain torch runs.

Needs the serve extra: pip install 'laplacefim[serve]'. Runs in about half a minute:

    python examples/serve_classifier.py
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch
from _smoke import size
from sklearn.datasets import load_digits
from torch import nn

from laplacefim import Laplace
from laplacefim.serving import Predictor

MODEL_SOURCE = """
from torch import nn

def make_net():
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
"""


def post(url: str, body: object) -> tuple[int, dict]:
    """POST JSON with the standard library; return the status and the decoded answer."""
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="laplacefim-serve-"))
    (folder / "net.py").write_text(MODEL_SOURCE)
    sys.path.insert(0, str(folder))
    from net import make_net  # the factory the server will call too

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=g)
    train, val, test = order[:1200], order[1200:1500], order[1500:]

    # 1. train, fit the posterior, tune its prior
    model = make_net()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(size(40, 1)):
        for rows in train[torch.randperm(len(train), generator=g)].split(64):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
            optimiser.step()
    batches = [(x[rows], y[rows]) for rows in train.split(256)]
    la = Laplace(model, "classification", subset="last_layer", structure="kron")
    la.fit(batches).tune_prior()

    # 2. abstention: answer 95% of held-out inputs, the most certain ones
    report = la.calibrate_abstention([(x[val], y[val])], target_coverage=0.95)
    rule = report.rule
    print(
        f"abstain when max probability < {rule.threshold:.3f}: held-out coverage "
        f"{rule.coverage:.3f}, error rate on the answered {rule.risk:.3f} (AURC {rule.aurc:.4f}, "
        f"an oracle {report.optimal_aurc:.4f})"
    )

    # 3. save the weights and the posterior (with its rule)
    torch.save(model.state_dict(), folder / "weights.pt")
    la.save(folder / "laplace.pt")

    # in-process, a service would embed the Predictor
    first = Predictor(model, la).predict(x[test[:1]])[0]
    print("in process:", first.prediction, f"p={max(first.probabilities):.3f}", first.abstain)

    # 4. serve
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable, "-m", "laplacefim", "serve",
        "--model", f"{folder / 'net.py'}:make_net",
        "--weights", str(folder / "weights.pt"),
        "--laplace", str(folder / "laplace.pt"),
        "--port", str(port), "--max-batch", "64", "--max-wait-ms", "5",
    ]  # fmt: skip
    server = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        # 5. query from Python ...
        status, answer = post(url + "/v1/predict", {"inputs": x[test[:3]].tolist()})
        for result, label in zip(answer["results"], y[test[:3]].tolist(), strict=True):
            top = max(result["probabilities"])
            information = result["uncertainty"]["mutual_information"]
            print(
                f"label {label}: predicted {result['prediction']}, p={top:.3f}, "
                f"mutual information {information:.4f}, abstain {result['abstain']}"
            )
        noise = torch.rand(1, 64, generator=g)  # not a digit
        status, answer = post(url + "/v1/predict", {"inputs": noise.tolist()})
        (result,) = answer["results"]
        print(f"noise: ood_score {result['ood_score']:.4f}, abstain {result['abstain']}")
        status, answer = post(url + "/v1/predict", {"inputs": [[0.0] * 63]})
        print(f"a wrong shape is refused: {status} {answer['error']}")
        with urllib.request.urlopen(url + "/v1/metadata") as response:
            meta = json.loads(response.read())
        posterior = meta["posterior"]
        print(f"metadata: {posterior['structure']} over {posterior['n_params']} weights")
        # ... and with curl
        print("with curl:")
        print(f"  curl -s -X POST {url}/v1/predict -H 'content-type: application/json' \\")
        values = json.dumps([round(v, 3) for v in x[test[0]].tolist()])
        print(f"       -d '{{\"inputs\": [{values}]}}'")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)

    # 6. export: a program that plain torch runs (no laplacefim needed to load it)
    la.export(folder / "predictive.pt2", x[test[:8]])
    program = torch.export.load(str(folder / "predictive.pt2")).module()
    difference = (program(x[test])["probs"] - la.predict(x[test]).probs).abs().max()
    print(f"exported predictive: max |difference| from la.predict {float(difference):.1e}")
    print(f"files in {folder}")


if __name__ == "__main__":
    main()
