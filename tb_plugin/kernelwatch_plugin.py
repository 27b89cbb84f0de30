"""The KernelWatch TensorBoard plugin: JSON routes over the data provider, and the frontend.

Registered through the ``tensorboard_plugins`` entry point, so plain ``tensorboard --logdir``
shows a "KernelWatch" tab. Imports no torch: only :mod:`kernelwatch.format` is shared with
the writer.

No route answers 5xx: missing data is a 404, bad arguments a 400, unreadable records are
listed in ``errors`` (or a 422 for the one record a route serves), and anything unexpected is
logged and answered as a 422 with its message. No JSON answer passes :data:`MAX_ANSWER_BYTES`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from tensorboard import errors as tb_errors
from tensorboard import plugin_util
from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers
from werkzeug.security import safe_join

from kernelwatch import format as fmt
from kernelwatch.reading import MEASURES, NotFound, Reader

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: Only these files types are served from ``static/``; anything else is a 404.
_STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".txt": "text/plain"}
#: The largest JSON answer; the reader bounds its views far below it, this is the last guard.
MAX_ANSWER_BYTES = 1_000_000
_MAX_MESSAGE = 1000
#: What a route answers once TensorBoard's data server has stopped (docs/plugin.md).
DATA_SERVER_DOWN = (
    "TensorBoard's data server is not answering: it stops at an event file holding a record it cannot "
    "read (one that claims more memory than there is). `kernelwatch summary LOGDIR` names such a file: "
    "move it out of the log directory and restart TensorBoard"
)

logger = logging.getLogger(__name__)

Handler = Callable[[wrappers.Request], wrappers.Response]


class KernelWatchPlugin(base_plugin.TBPlugin):
    """Per-layer cluster timelines, heat map, sprites, anomalies, spectra and the first-layer
    lens of kernelwatch runs."""

    plugin_name = fmt.PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext):
        hints = context.sampling_hints or {}
        self._reader = Reader(context.data_provider, hints.get(fmt.PLUGIN_NAME)) if context.data_provider else None

    def get_plugin_apps(self) -> dict[str, Handler]:
        json_routes = {
            "/runs": lambda r, ctx, eid: self._reader.runs(ctx, eid),
            "/layers": lambda r, ctx, eid: self._reader.layers(ctx, eid, _arg(r, "run")),
            "/timeline": lambda r, ctx, eid: self._reader.timeline(
                ctx, eid, _arg(r, "run"), _arg(r, "layer"), _lens(r)
            ),
            "/heatmap": lambda r, ctx, eid: self._reader.heatmap(
                ctx, eid, _arg(r, "run"), _lens(r), _choice(r, "measure", MEASURES, MEASURES[0])
            ),
            "/anomalies": lambda r, ctx, eid: self._reader.anomalies(ctx, eid, _arg(r, "run")),
            "/sprite": lambda r, ctx, eid: self._reader.sprite(
                ctx, eid, _arg(r, "run"), _arg(r, "layer"), _step(r), _lens(r)
            ),
            "/spectrum": lambda r, ctx, eid: self._reader.spectrum(ctx, eid, _arg(r, "run")),
            "/first_layer": lambda r, ctx, eid: self._reader.first_layer(
                ctx, eid, _arg(r, "run"), r.args.get("layer"), _step(r)
            ),
        }
        png_routes = {
            "/sprite.png": lambda r, ctx, eid: self._reader.sprite_png(
                ctx, eid, _arg(r, "run"), _arg(r, "layer"), _step(r), _lens(r)
            ),
            "/spectrum.png": lambda r, ctx, eid: self._reader.spectrum_png(
                ctx, eid, _arg(r, "run"), _int(r, "kernel_size")
            ),
            "/first_layer.png": lambda r, ctx, eid: self._reader.first_layer_png(
                ctx, eid, _arg(r, "run"), _arg(r, "layer"), _step(r)
            ),
        }
        apps: dict[str, Handler] = {path: self._json_app(view) for path, view in json_routes.items()}
        apps.update({path: self._png_app(view) for path, view in png_routes.items()})
        apps["/index.js"] = _static_app("index.js")
        apps["/static/*"] = _static_app(None)
        return apps

    def is_active(self) -> bool:
        # TensorBoard already activates the tab when the data provider lists our plugin name.
        return False

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="KernelWatch")

    def _json_app(self, view: Callable[[wrappers.Request, Any, str], Any]) -> Handler:
        def answer(request: wrappers.Request, ctx: Any, eid: str) -> bytes:
            body = fmt.encode_json(view(request, ctx, eid))
            if len(body) > MAX_ANSWER_BYTES:
                logger.warning("kernelwatch: %s would answer %d bytes; refused", request.full_path, len(body))
                raise _ClientError(
                    f"this answer would be {len(body):,} bytes, over the plugin's limit of {MAX_ANSWER_BYTES:,}", 422
                )
            return body

        @wrappers.Request.application
        def app(request: wrappers.Request) -> wrappers.Response:
            try:
                body, code = self._call(answer, request), 200
            except _ClientError as err:
                body, code = fmt.encode_json({"error": str(err)}), err.code
            return http_util.Respond(request, body, "application/json", code=code)

        return app

    def _png_app(self, view: Callable[[wrappers.Request, Any, str], bytes]) -> Handler:
        @wrappers.Request.application
        def app(request: wrappers.Request) -> wrappers.Response:
            try:
                return http_util.Respond(request, self._call(view, request), "image/png")
            except _ClientError as err:
                return http_util.Respond(request, str(err), "text/plain", code=err.code)

        return app

    def _call(self, view: Callable[[wrappers.Request, Any, str], Any], request: wrappers.Request) -> Any:
        """Run a view; map missing data, bad arguments and bad records to 4xx, never a 500."""
        if self._reader is None:
            raise _ClientError("this TensorBoard has no data provider", 404)
        ctx = plugin_util.context(request.environ)
        eid = plugin_util.experiment_id(request.environ)
        try:
            return view(request, ctx, eid)
        except _ClientError:
            raise
        except NotFound as err:
            raise _ClientError(str(err), 404) from err
        except fmt.FormatError as err:
            raise _ClientError(f"unreadable kernelwatch data: {err}", 422) from err
        except tb_errors.PublicError as err:
            raise _ClientError(str(err), err.http_code if 400 <= err.http_code < 500 else 422) from err
        except Exception as err:  # the last guard: a bug or an unforeseen record never answers 500
            if isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.UNAVAILABLE:
                logger.warning("kernelwatch: %s failed: %s", request.full_path, DATA_SERVER_DOWN)
                raise _ClientError(DATA_SERVER_DOWN, 422) from err
            logger.exception("kernelwatch: %s failed", request.full_path)
            raise _ClientError(
                f"KernelWatch could not answer this request ({type(err).__name__}: {err}); "
                "TensorBoard's log has the details",
                422,
            ) from err


class _ClientError(Exception):
    def __init__(self, message: str, code: int = 400):
        # Messages may quote the request's arguments or a record: keep them short.
        super().__init__(message if len(message) <= _MAX_MESSAGE else message[: _MAX_MESSAGE - 3] + "...")
        self.code = code


def _arg(request: wrappers.Request, name: str) -> str:
    value = request.args.get(name)
    if value is None:
        raise _ClientError(f"missing query parameter {name!r}")
    return value


def _int(request: wrappers.Request, name: str) -> int:
    value = _arg(request, name)
    try:
        return int(value)
    except ValueError:
        raise _ClientError(f"query parameter {name!r} must be an integer, got {value!r}") from None


def _step(request: wrappers.Request) -> int | None:
    return _int(request, "step") if "step" in request.args else None


def _choice(request: wrappers.Request, name: str, allowed: tuple[str, ...], default: str) -> str:
    value = request.args.get(name, default)
    if value not in allowed:
        raise _ClientError(f"query parameter {name!r} must be one of {list(allowed)}, got {value!r}")
    return value


def _lens(request: wrappers.Request) -> str:
    return _choice(request, "lens", fmt.LENSES, fmt.WEIGHTS)


def _static_app(fixed: str | None) -> Handler:
    """Serve ``static/<fixed>``, or ``static/<rest of the path>`` for the ``/static/*`` route;
    traversal out of ``static/`` and unknown file types are a 404."""

    @wrappers.Request.application
    def app(request: wrappers.Request) -> wrappers.Response:
        name = fixed or request.path.split("/static/", 1)[-1]
        path = safe_join(str(STATIC_DIR), name)
        suffix = Path(name).suffix
        try:
            found = path is not None and suffix in _STATIC_TYPES and Path(path).is_file()
        except (OSError, ValueError):  # a NUL or an overlong name
            found = False
        if not found:
            return http_util.Respond(request, "not found", "text/plain", code=404)
        # The vendored library is large; let the browser keep it.
        expires = 3600 if name.startswith("echarts") else 0
        return http_util.Respond(request, Path(path).read_bytes(), _STATIC_TYPES[suffix], expires=expires)

    return app

