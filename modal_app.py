"""Modal entry: `modal deploy modal_app.py` (see docs/PLATFORMS.md).

- `Worker` (GPU class): the model loads once per container in `@modal.enter`; `generate` streams the job's items
  (`Worker().generate.remote_gen(req)`), `run` returns only the final result (`.remote`, `.spawn`, `.map`).
- `submit` (POST web endpoint): {"jobs": [...], "callback_url": "https://..."} -> spawns `Worker().run` per job
  and returns the call ids; `deliver` (CPU) waits for each call and POSTs its result to the callback, signed
  with HMAC-SHA256 (worker/webhook.py). `result` (GET web endpoint): poll one call id.
- An unhealthy rank pool retires the container: `modal.experimental.stop_fetching_inputs()` (graceful: the
  current input reports its error, then the container exits and Modal starts a fresh one for the next input).

Deploy-time settings (environment of the `modal deploy` command; defaults in brackets):
  LINGBOT_MODAL_APP [lingbot-worker]   LINGBOT_MODAL_GPU [H100:4] (count -> LINGBOT_NUM_GPUS)
  LINGBOT_MODAL_MODEL [robbyant/lingbot-world-fast-diffusers]   LINGBOT_MODAL_VOLUME [lingbot-models]
  LINGBOT_MODAL_S3_SECRET [lingbot-s3]   LINGBOT_MODAL_WEBHOOK_SECRET [lingbot-webhook] ("" = none)
  LINGBOT_MODAL_BASE_IMAGE [pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime]   LINGBOT_MODAL_PROXY_AUTH [1]
Importing this file needs no Modal credentials (everything is lazy until deploy/run).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import modal

log = logging.getLogger("modal_app")

ROOT = Path(__file__).resolve().parent
MODELS_DIR = "/models"
APP_NAME = os.environ.get("LINGBOT_MODAL_APP", "lingbot-worker")
GPU = os.environ.get("LINGBOT_MODAL_GPU", "H100:4")
MODEL = os.environ.get("LINGBOT_MODAL_MODEL", "robbyant/lingbot-world-fast-diffusers")
BASE_IMAGE = os.environ.get("LINGBOT_MODAL_BASE_IMAGE", "pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime")
S3_SECRET = os.environ.get("LINGBOT_MODAL_S3_SECRET", "lingbot-s3")
WEBHOOK_SECRET = os.environ.get("LINGBOT_MODAL_WEBHOOK_SECRET", "lingbot-webhook")
PROXY_AUTH = os.environ.get("LINGBOT_MODAL_PROXY_AUTH", "1").strip().lower() not in ("0", "false", "no", "off")
JOB_TIMEOUT_S = int(os.environ.get("LINGBOT_MODAL_TIMEOUT_S", "3600"))


def gpu_count(gpu: str) -> int:
    """"H100:4" -> 4, "H200" -> 1."""
    _, _, count = gpu.partition(":")
    return int(count) if count.strip() else 1


NUM_GPUS = gpu_count(GPU)

RUNTIME_ENV = {
    # Weights live on the volume: download_model writes the HF cache there (<volume>/hub/models--org--name), and
    # resolve_model looks in LINGBOT_MODEL_DIR and the HF cache; nothing is downloaded at container start.
    "HF_HOME": MODELS_DIR,
    "LINGBOT_MODEL_DIR": MODELS_DIR,
    "LINGBOT_MODEL": MODEL,
    "LINGBOT_NUM_GPUS": str(NUM_GPUS),
    "LINGBOT_OUTPUT_DIR": "/tmp/lingbot-outputs",
    # Compiled kernels on the volume: later containers skip ~44 s of compilation (docs/PERFORMANCE.md v16).
    "LINGBOT_COMPILE_CACHE": f"{MODELS_DIR}/compile-cache",
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}

app = modal.App(APP_NAME)
volume = modal.Volume.from_name(os.environ.get("LINGBOT_MODAL_VOLUME", "lingbot-models"), create_if_missing=True)
# The base image brings CUDA torch; pip keeps it because it satisfies the package's torch range.
image = (
    modal.Image.from_registry(BASE_IMAGE)
    .pip_install_from_pyproject(str(ROOT / "pyproject.toml"), optional_dependencies=["modal", "fa4"])
    .env(RUNTIME_ENV)
    .add_local_python_source("worker")
)
# Web functions only validate, spawn and post: no torch, no GPU.
web_image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install("fastapi[standard]>=0.110", "msgspec>=0.18", "urllib3>=2", "certifi")
    .add_local_python_source("worker")
)
s3_secrets = [modal.Secret.from_name(S3_SECRET)] if S3_SECRET else []
webhook_secrets = [modal.Secret.from_name(WEBHOOK_SECRET)] if WEBHOOK_SECRET else []


def _stop_container(reason: str) -> None:
    """Retire this container: Modal finishes the current input, then replaces the container."""
    log.error("worker must be replaced: %s", reason)
    try:
        import modal.experimental

        modal.experimental.stop_fetching_inputs()
    except Exception as exc:  # noqa: BLE001 - outside a container (local runs, tests) there is nothing to stop
        log.warning("stop_fetching_inputs unavailable (%s); not in a Modal container", exc)


def _job_id() -> str | None:
    try:
        return modal.current_function_call_id()
    except Exception:  # noqa: BLE001 - local call
        return None


def _commit_compile_cache() -> None:
    """Make the kernels this container compiled at start-up visible to the next containers (a Modal volume shows
    a container's writes to others only once committed). Entries are content-addressed, so concurrent commits of
    the same kernels agree; a failed commit only costs the next container its compile time."""
    cache = os.environ.get("LINGBOT_COMPILE_CACHE", "")
    if not cache.startswith(MODELS_DIR + "/"):
        return
    try:
        volume.commit()
    except Exception as e:  # noqa: BLE001 - never fail a warm worker over a cache
        logging.getLogger("modal_app").warning("compile cache not committed to the volume: %s", e)


@app.cls(image=image, gpu=GPU, volumes={MODELS_DIR: volume}, secrets=s3_secrets, timeout=JOB_TIMEOUT_S,
         scaledown_window=300)
class Worker:
    @modal.enter()
    def load(self) -> None:
        from worker.parallel import early

        early.start()  # the follower ranks import the worker beside this process (LINGBOT_NUM_GPUS > 1)
        from worker.service import serve_from_env

        self.runner = serve_from_env()
        self.runner.on_fatal = self._retire
        self.retired = False
        _commit_compile_cache()

    def _retire(self, reason: str) -> None:
        if not self.retired:
            self.retired = True
            _stop_container(reason)

    def _items(self, request: Any) -> Iterator[dict[str, Any]]:
        return self.runner.run(request, job_id=_job_id())

    @modal.method()
    def generate(self, request: dict) -> Iterator[dict[str, Any]]:
        """Every item: chunks (or progress), then the video result; or one error item."""
        yield from self._items(request)

    @modal.method()
    def run(self, request: dict) -> dict[str, Any]:
        """The final item only (video result or error); frames are not encoded (stream format forced to none)."""
        if isinstance(request, Mapping):
            request = {**request, "stream": {"format": "none"}}
        last: dict[str, Any] = {"error": "the job produced no result", "field": None}
        for item in self._items(request):
            if item.get("type") not in ("chunk", "progress"):
                last = item
        return last

    @modal.exit()
    def close(self) -> None:
        generator = getattr(getattr(self, "runner", None), "generator", None)
        if hasattr(generator, "close"):
            generator.close()


# --- batch jobs with a callback ------------------------------------------------------------------------------


def submit_batch(body: Any, *, env: Mapping[str, str], spawn: Callable[[dict], str],
                 deliver: Callable[[str, list[str], str], Any]) -> dict[str, Any]:
    """Validate, spawn one call per job, start the delivery; raises webhook.BatchError for a bad batch."""
    from worker import webhook

    jobs, callback = webhook.parse_batch(body, env=env)
    if callback and not env.get("LINGBOT_WEBHOOK_SECRET"):
        raise webhook.BatchError("callback_url", "this deployment has no LINGBOT_WEBHOOK_SECRET to sign callbacks")
    batch_id = uuid.uuid4().hex
    call_ids = [spawn(job) for job in jobs]
    if callback:
        deliver(batch_id, call_ids, callback)
    return {"batch_id": batch_id, "call_ids": call_ids, "callback_url": callback is not None}


def deliver_one(batch_id: str, index: int, call_id: str, get_result: Callable[[], Any], callback_url: str,
                env: Mapping[str, str], **post_options: Any):
    """Wait for one call's result (or its failure) and POST it to the callback, signed."""
    from worker import netguard, webhook

    try:
        result = get_result()
    except Exception as exc:  # noqa: BLE001 - a crashed or timed-out call is still reported
        result = {"error": f"job failed: {type(exc).__name__}: {exc}"[:2000], "field": None}
    payload = {"batch_id": batch_id, "index": index, "call_id": call_id, "result": result}
    return webhook.post_signed(
        callback_url, payload, env["LINGBOT_WEBHOOK_SECRET"], allow_private=netguard.allow_private_from_env(env),
        delivery_id=f"{batch_id}-{index}", **post_options,
    )


@app.function(image=web_image, secrets=webhook_secrets, timeout=24 * 3600)
def deliver(batch_id: str, call_ids: list[str], callback_url: str) -> list[dict]:
    def one(args):
        index, call_id = args
        call = modal.FunctionCall.from_id(call_id)
        d = deliver_one(batch_id, index, call_id, lambda: call.get(timeout=JOB_TIMEOUT_S + 600), callback_url,
                        os.environ)
        return {"index": index, "ok": d.ok, "attempts": d.attempts, "error": d.error}

    with ThreadPoolExecutor(max_workers=min(16, len(call_ids))) as pool:
        return list(pool.map(one, enumerate(call_ids)))


@app.function(image=web_image, secrets=webhook_secrets)
@modal.fastapi_endpoint(method="POST", requires_proxy_auth=PROXY_AUTH)
def submit(body: dict):
    from fastapi.responses import JSONResponse

    from worker import webhook

    try:
        return submit_batch(
            body, env=os.environ, spawn=lambda job: Worker().run.spawn(job).object_id,
            deliver=lambda b, ids, url: deliver.spawn(b, ids, url),
        )
    except webhook.BatchError as exc:
        return JSONResponse(status_code=400, content={"error": str(exc), "field": exc.field})


@app.function(image=web_image)
@modal.fastapi_endpoint(method="GET", requires_proxy_auth=PROXY_AUTH)
def result(call_id: str):
    from fastapi.responses import JSONResponse

    try:
        call = modal.FunctionCall.from_id(call_id)
        return {"call_id": call_id, "status": "done", "result": call.get(timeout=0)}
    except modal.exception.OutputExpiredError:
        return JSONResponse(status_code=410, content={"call_id": call_id, "status": "expired"})
    except TimeoutError:
        return {"call_id": call_id, "status": "pending"}
    except Exception as exc:  # noqa: BLE001 - unknown id, or the call itself failed
        return JSONResponse(status_code=404 if "not found" in str(exc).lower() else 500,
                            content={"call_id": call_id, "status": "failed", "error": f"{type(exc).__name__}: {exc}"})


def _bf16_copy(snapshot: str, repo_id: str, root: str = MODELS_DIR) -> str:
    """A bf16 copy of a downloaded checkpoint at <root>/<org>/<name>, where resolve_model looks before the HF cache
    ($LINGBOT_MODEL_DIR): every cold start then reads 37 GB of DiT instead of 74 (worker/models/convert.py).
    Written once; an existing copy is kept."""
    from worker.models.convert import convert_checkpoint
    from worker.models.loading import resolve_model

    dst = Path(root) / repo_id
    if not dst.exists():
        convert_checkpoint(resolve_model(snapshot), dst)
    return str(dst)


@app.function(image=image, volumes={MODELS_DIR: volume}, timeout=4 * 3600)
def download_model(repo_id: str = MODEL, bf16: bool = True) -> str:
    """`modal run modal_app.py::download_model` once: snapshot the weights into the volume's HF cache, then (unless
    `--no-bf16`) write the bf16 copy of the DiT the workers load first."""
    from huggingface_hub import snapshot_download

    path = snapshot_download(repo_id)
    if bf16:
        path = _bf16_copy(path, repo_id)
    volume.commit()
    return path
