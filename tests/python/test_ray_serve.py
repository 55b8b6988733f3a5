"""apportion.ray.serve.deployment: several models under apportion quotas in one Ray Serve replica,
through a Serve handle and over HTTP (the proxy on 127.0.0.1), on a real local Ray cluster."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

import apportion as ap

pytest.importorskip("ray", reason="ray is not installed: pip install 'apportion[ray]'")
pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install 'apportion[ray]'")

import ray  # noqa: E402
from ray import serve  # noqa: E402

from apportion.ray.serve import deployment  # noqa: E402

pytestmark = pytest.mark.timeout(240)

PREFIX = "/apportion"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def specs() -> list[ap.ModelSpec]:
    # On a worker's CPUs "0-1": left gets one core of its own, echo and right share the other.
    return [ap.ModelSpec("echo", factory="ray_models:echo", max_queue=8),
            ap.ModelSpec("left", factory="ray_models:where", cores=1, isolation="exclusive"),
            ap.ModelSpec("right", factory="ray_models:where")]


class App:
    def __init__(self, handle: Any, port: int) -> None:
        self.handle = handle
        self.port = port

    def post(self, path: str, body: object) -> tuple[int, Any]:
        return self.post_with_headers(path, body)[:2]  # type: ignore[return-value]

    def post_with_headers(self, path: str, body: object) -> tuple[int, Any, dict[str, str]]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{PREFIX}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read()), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read()), dict(e.headers)


@pytest.fixture(scope="module")
def app(local_ray: Any) -> Iterator[App]:
    port = free_port()
    # One proxy, on the head node, on loopback only (every local node shares this address).
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    try:
        handle = serve.run(deployment(specs(), num_cpus=2), name="apportion", route_prefix=PREFIX)
        yield App(handle, port)
    finally:
        serve.shutdown()


def listening(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp writes them) of sockets listening on ``port``."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                lines = fh.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, _, p = local.rpartition(":")
            if state == "0A" and int(p, 16) == port:  # 0A: LISTEN
                out.add(addr)
    return out


def test_a_replica_of_gpu_and_numa_models_plans_and_reserves_its_gpus() -> None:
    # The replica's made-up node had no GPU and one NUMA node: such specs never deployed.
    # Planned in a process of its own, connected to no Ray cluster: with one connected (this
    # module's, when the test runs after others), deployment() checks that a node has the GPUs,
    # and this machine's cluster has none.
    code = """if True:
        import json
        import apportion as ap
        from apportion.ray.serve import deployment
        gpu = ap.ModelSpec("g", factory="ray_models:echo", gpu=ap.GPU(device=1))
        pinned = ap.ModelSpec("n", factory="ray_models:echo", numa=1, cores=1, isolation="exclusive")
        opts = lambda specs, **kw: deployment(specs, **kw)._bound_deployment.ray_actor_options
        print(json.dumps([opts([gpu, pinned]), opts([gpu], num_gpus=0.5), opts([pinned]),
                          opts([pinned], num_gpus=1)]))
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    both, half, pinned_only, pinned_one = json.loads(out.stdout.strip().splitlines()[-1])
    assert both == {"num_cpus": 2.0, "num_gpus": 2.0}  # devices 0 and 1: the spec names index 1
    assert half["num_gpus"] == 0.5
    assert "num_gpus" not in pinned_only
    assert pinned_one["num_gpus"] == 1.0


def test_a_replica_no_node_can_hold_is_refused_before_serve_run(app: App) -> None:
    # serve.run waited for ever, the deployment "taking more than 30s to be scheduled".
    wide = ap.ModelSpec("w", factory="ray_models:echo", cores=3, isolation="exclusive")
    with pytest.raises(ap.PlacementError, match=r"deployment 'wide': a replica reserves 3 CPUs; no node of the "
                                                r"connected Ray cluster has them \(the largest: 2 CPUs, 0 GPUs\)"):
        deployment([wide], name="wide")
    gpu = ap.ModelSpec("g", factory="ray_models:echo", gpu=ap.GPU(device=0))
    with pytest.raises(ap.PlacementError, match="reserves 1 CPUs and 1 GPUs"):
        deployment([gpu], name="gpu")
    assert deployment([wide], num_cpus=2)._bound_deployment.ray_actor_options == {"num_cpus": 2.0}


def test_proxy_listens_on_loopback_only(app: App) -> None:
    assert listening(app.port) == {"0100007F"}  # 127.0.0.1


def test_replica_reserves_its_cpus(app: App) -> None:
    assert ray.available_resources().get("CPU", 0.0) == 5.0 - 2.0
    # By default, the exclusive model's core plus the widest shared model's (the shared ones
    # float on one pool, as on one host): 1 + 1. Each shared model counted a core of its own,
    # so three shared models asked 3 CPUs of a 2-CPU node and never started.
    assert deployment(specs())._bound_deployment.ray_actor_options["num_cpus"] == 2.0
    shared = [ap.ModelSpec(n, factory="ray_models:echo", instances=i) for n, i in (("a", 1), ("b", 2), ("c", 1))]
    assert deployment(shared)._bound_deployment.ray_actor_options["num_cpus"] == 2.0


def test_handle_serves_each_model_on_its_own_cpus(app: App) -> None:
    assert app.handle.infer.remote("echo", [1, 2]).result(timeout_s=60) == [1, 2]
    left = app.handle.infer.remote("left", 1).result(timeout_s=60)
    right = app.handle.infer.remote("right", 2).result(timeout_s=60)
    assert left["pid"] == right["pid"]  # one replica process hosts both models
    assert len(left["cpus"]) == 1 and len(right["cpus"]) == 1 and left["cpus"] != right["cpus"]


def test_handle_errors(app: App) -> None:
    with pytest.raises(ap.ModelNotFound):
        app.handle.infer.remote("nope", 1).result(timeout_s=60)
    with pytest.raises(ValueError, match="handle boom"):
        app.handle.infer.remote("echo", {"raise": "handle boom"}).result(timeout_s=60)
    # An exception that cannot be rebuilt where the caller is (its constructor takes other
    # arguments than its args) arrives as one naming the model, its type and its message.
    with pytest.raises(RuntimeError, match=r"model 'echo' raised ray_models\.CodedError: coded boom") as e:
        app.handle.infer.remote("echo", {"raise_coded": "coded boom"}).result(timeout_s=60)
    assert "could not be sent" in str(e.value)
    # A model's SystemExit or KeyboardInterrupt stopped the replica's event loop: the request
    # got Ray's stream error, and the others hung until Serve replaced the replica (~90 s).
    for poison, word in (({"exit": 3}, "SystemExit: 3"), ({"interrupt": "stop"}, "KeyboardInterrupt: stop")):
        with pytest.raises(RuntimeError, match=f"model 'echo' raised builtins.{word}"):
            app.handle.infer.remote("echo", poison).result(timeout_s=60)
        assert app.handle.infer.remote("echo", 7).result(timeout_s=60) == 7
        code, body = app.post("/echo", {"inputs": poison})
        assert code == 500 and f"builtins.{word}" in body["error"], body
    assert app.post("/echo", {"inputs": 8}) == (200, {"model": "echo", "outputs": 8})


def test_http_by_model_name(app: App) -> None:
    assert app.post("/echo", {"inputs": {"a": [1, 2]}}) == (200, {"model": "echo", "outputs": {"a": [1, 2]}})
    with urllib.request.urlopen(f"http://127.0.0.1:{app.port}{PREFIX}/", timeout=60) as r:
        assert json.loads(r.read()) == {"models": ["echo", "left", "right"]}
    code, body = app.post("/nope", {"inputs": 1})
    assert code == 404 and body["type"] == "ModelNotFound" and "nope" in body["error"]
    code, body = app.post("/echo", {"inputs": {"raise": "http boom"}})
    assert code == 500 and body == {"error": "http boom", "type": "ValueError"}
    code, body = app.post("/echo", {"x": 1})
    assert code == 422 and "inputs" in body["error"]
    before = app.handle.stats.remote().result(timeout_s=60)["echo"].submitted
    for bad in ({"timeout_ms": "soon"}, {"timeout_ms": -5}, {"priority": 7}):  # were 500, as the model's own error
        code, body = app.post("/echo", {"inputs": 1, **bad})
        assert code == 422 and body["type"] == "QuotaError" and "model 'echo', field" in body["error"], (bad, body)
    assert app.handle.stats.remote().result(timeout_s=60)["echo"].submitted == before  # none was admitted
    code, body = app.post("/echo", {"inputs": {"bytes": "raw"}})  # was a bare "Internal Server Error"
    assert code == 500 and body["type"] == "OutputError" and "model 'echo': its output cannot be sent as JSON" in body["error"]
    code, body = app.post("/echo", {"inputs": {"sleep": 0.3}, "timeout_ms": 10_000})
    assert code == 200


def running(app: App, pool: Any, sleep_s: float) -> Any:
    """Sends a request that sleeps ``sleep_s`` and returns its future once the replica admitted it."""
    import time

    before = app.handle.stats.remote().result(timeout_s=60)["echo"].submitted
    fut = pool.submit(app.post, "/echo", {"inputs": {"sleep": sleep_s}})
    deadline = time.monotonic() + 30
    while app.handle.stats.remote().result(timeout_s=60)["echo"].submitted == before:
        assert time.monotonic() < deadline, "the request never reached the replica"
        time.sleep(0.02)
    return fut


def test_http_deadline_and_queue_full(app: App) -> None:
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(16) as pool:
        slow = running(app, pool, 1.0)
        # Queued behind the running call (one instance) with a deadline it cannot meet.
        late = [pool.submit(app.post, "/echo", {"inputs": 1, "timeout_ms": 100}) for _ in range(2)]
        assert slow.result(60)[0] == 200
        assert [f.result(60)[0] for f in late] == [504, 504]
        gate = running(app, pool, 2.0)
        many = [pool.submit(app.post_with_headers, "/echo", {"inputs": 1}) for _ in range(12)]
        answers = [f.result(60) for f in many]
        codes = sorted(code for code, _, _ in answers)
        assert all(h.get("retry-after", h.get("Retry-After")) == "1" and b["type"] == "QueueFull"
                   for code, b, h in answers if code == 429)
        assert gate.result(60)[0] == 200
    assert codes == [200] * 8 + [429] * 4  # max_queue=8 behind the running call


def test_a_configs_runtime_settings_reach_the_replica(app: App) -> None:  # app: Serve started on 127.0.0.1
    # The [runtime] table was dropped: weights and classes (which need the scheduled pool) made
    # the replica fail to start, seen only in Serve's controller log.
    from apportion.config import Config

    cfg = Config.loads('[runtime]\nshared_pool = "scheduled"\n'
                       '[models.hi]\nfactory = "ray_models:echo"\npriority_class = 1\n'
                       '[models.lo]\nfactory = "ray_models:echo"\nweight = 3.0\n', "sched.toml")
    app = deployment(cfg, name="sched", num_cpus=1)
    assert app._bound_deployment.init_args[2] == {"shared_pool": "scheduled", "pool_reserve": None,
                                                  "reserve_nice": 10}
    handle = serve.run(app, name="sched", route_prefix="/sched")
    try:
        assert handle.infer.remote("hi", 1).result(timeout_s=60) == 1
        assert handle.infer.remote("lo", 2).result(timeout_s=60) == 2
    finally:
        serve.delete("sched")


# -- the replica's CPU set: its node's label --------------------------------------------------------

CUSTOM_LABEL = "apportion-test-cpus"  # a cpu_set_label of the deployment's own
PAIR_LABEL = "apportion-test-pair"  # two CPUs, written as Ray labels must ("_" for ",")
ABSENT_LABEL = "apportion-test-absent"  # names a CPU no test machine has (CPU ids parse up to 65535)
MALFORMED_LABEL = "apportion-test-malformed"  # no CPU list
ABSENT_CPU = 4096


@pytest.fixture
def labelled(local_ray: Any, app: App) -> Iterator[dict[str, str]]:  # app: Serve started on 127.0.0.1
    """Adds a node whose labels name CPU sets: the default label (CPU_SET_LABEL) this process's
    highest CPU, CUSTOM_LABEL its lowest, PAIR_LABEL its lowest two ("0_1"), ABSENT_LABEL one of
    them and an absent CPU, MALFORMED_LABEL no CPU list. It has 1 CPU and the cluster's only
    GPU (a logical one), so a replica that reserves a GPU lands there. Yields the labels; removes the
    node after the test (the module's other tests count the cluster's CPUs and GPUs)."""
    from apportion.ray.cluster import CPU_SET_LABEL

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs: on one, a label naming it reads the same as no label")
    labels = {CPU_SET_LABEL: str(cpus[-1]), CUSTOM_LABEL: str(cpus[0]), PAIR_LABEL: f"{cpus[0]}_{cpus[1]}",
              ABSENT_LABEL: f"{cpus[0]}_{ABSENT_CPU}", MALFORMED_LABEL: f"{cpus[0]}_x"}
    node = local_ray.cluster.add_node(num_cpus=1, num_gpus=1, labels=labels, object_store_memory=80 * 2**20)
    try:
        local_ray.cluster.wait_for_nodes(timeout=60)
        yield labels
    finally:
        local_ray.cluster.remove_node(node)
        deadline = time.monotonic() + 60
        while ray.cluster_resources().get("GPU", 0.0) != 0.0 or ray.cluster_resources().get("CPU", 0.0) != 5.0:
            assert time.monotonic() < deadline, "the labelled node never left the cluster"
            time.sleep(0.2)


def on_labelled(specs: list[ap.ModelSpec], name: str, **kw: Any) -> Any:
    """``specs`` as a deployment whose replica lands on the labelled node (the one GPU)."""
    return deployment(specs, name=name, num_cpus=1, num_gpus=1, **kw)


def served_cpus(specs: list[ap.ModelSpec], name: str, **kw: Any) -> dict[str, list[int]]:
    """Deploys ``specs`` (ray_models:where models) as app ``name`` on the labelled node and
    answers, asked through a handle, the CPUs each model's worker thread may run on there."""
    handle = serve.run(on_labelled(specs, name, **kw), name=name, route_prefix=f"/{name}")
    try:
        return {s.name: handle.infer.remote(s.name, 0).result(timeout_s=60)["cpus"] for s in specs}
    finally:
        serve.delete(name)


@pytest.mark.timeout(180)
def test_a_replica_runs_on_the_cpus_its_nodes_label_names(labelled: dict[str, str], app: App) -> None:
    # The shared models float on the runtime's shared pool: every CPU the runtime may use, which
    # is the CPU the node's label names, not every CPU the replica's process may use.
    from apportion.ray.cluster import CPU_SET_LABEL

    one = int(labelled[CPU_SET_LABEL])
    shared = [ap.ModelSpec(n, factory="ray_models:where") for n in ("a", "b")]
    handle = serve.run(on_labelled(shared, "labelled"), name="labelled", route_prefix="/labelled")
    try:
        assert {m: handle.infer.remote(m, 0).result(timeout_s=60)["cpus"] for m in ("a", "b")} == {"a": [one],
                                                                                                   "b": [one]}
        req = urllib.request.Request(f"http://127.0.0.1:{app.port}/labelled/a", data=b'{"inputs": 1}',
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:  # the same replica over HTTP
            assert json.loads(r.read())["outputs"]["cpus"] == [one]
    finally:
        serve.delete("labelled")


@pytest.mark.timeout(180)
def test_a_custom_cpu_set_label_is_honoured_and_its_underscores_are_commas(labelled: dict[str, str]) -> None:
    from apportion.ray.cluster import CPU_SET_LABEL

    # The custom label's CPU, not the default label's (another CPU on the same node), nor every CPU.
    own = int(labelled[CUSTOM_LABEL])
    assert own != int(labelled[CPU_SET_LABEL])
    assert served_cpus([ap.ModelSpec("a", factory="ray_models:where")], "custom",
                       cpu_set_label=CUSTOM_LABEL) == {"a": [own]}
    # "0_1" is "0,1": the exclusive model gets one of the two, the shared one the other (in the
    # default label's single CPU they do not both fit; "0_1" as it is is no CPU list).
    pair = sorted(int(c) for c in labelled[PAIR_LABEL].split("_"))
    got = served_cpus(specs()[1:], "pair", cpu_set_label=PAIR_LABEL)
    assert len(got["left"]) == 1 and len(got["right"]) == 1 and sorted(got["left"] + got["right"]) == pair


@pytest.mark.timeout(180)
def test_a_label_naming_cpus_the_replica_cannot_use_fails_the_deployment_saying_why(
        labelled: dict[str, str]) -> None:
    echo = [ap.ModelSpec("a", factory="ray_models:echo")]
    # No CPU list at all: deployment() refuses it before any replica starts.
    with pytest.raises(ap.QuotaError, match=rf"cpu_set '{labelled[MALFORMED_LABEL].replace('_', ',')}' is not a "
                                            "CPU list"):
        on_labelled(echo, "malformed", cpu_set_label=MALFORMED_LABEL)
    # "0_4096" read as "0,4096": the replica's runtime refuses CPU 4096 (not the label's
    # spelling). serve.run fails instead of waiting for a replica that cannot start; its own
    # error only says that the deployment failed, the deployment's status says why.
    started = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=r"Deploying application absent failed"):
            serve.run(on_labelled(echo, "absent", cpu_set_label=ABSENT_LABEL), name="absent", route_prefix="/absent")
        status = serve.status().applications["absent"].deployments["absent"]
    finally:
        serve.delete("absent")
    assert time.monotonic() - started < 120
    assert status.status == "DEPLOY_FAILED", status
    assert f"QuotaError: field 'cpus': Runtime: CPU {ABSENT_CPU} is not present on this machine" in status.message, \
        status.message
