"""instrument() / uninstrument(): lazy, idempotent, version-gated patching of every adapter."""

import functools
import importlib
import importlib.metadata
import importlib.util
import os
import re
import threading

import wrapt

from ._config import env_bool, env_int, env_seconds, logger, setting
from ._package import SUPPORTED, UNCOVERED
from ._recorder import Recorder

ADAPTERS = {
    "urllib3": "poolscope.adapters.urllib3:Urllib3Adapter",
    "httpx": "poolscope.adapters.httpx:HttpxAdapter",
    "httpx2": "poolscope.adapters.httpx:Httpx2Adapter",
    "aiohttp": "poolscope.adapters.aiohttp:AiohttpAdapter",
    "pycurl": "poolscope.adapters.pycurl:PycurlAdapter",
    "urllib3-future": "poolscope.adapters.urllib3_future:Urllib3FutureAdapter",
    "curl_cffi": "poolscope.adapters.curl_cffi:CurlCffiAdapter",
}
# urllib3-future can install itself as ``urllib3`` (niquests then uses that copy): the
# ``urllib3`` modules are then observed as urllib3-future's
_FUTURE_AS_URLLIB3 = "urllib3-future as urllib3"
_ADAPTER_CLASSES = {**ADAPTERS, _FUTURE_AS_URLLIB3:
                    "poolscope.adapters.urllib3_future:Urllib3FutureAsUrllib3Adapter"}

_lock = threading.RLock()
_active = None  # the current _Instrumentation


class _Instrumentation:
    def __init__(self, recorder, libraries):
        self.recorder = recorder
        self.libraries = libraries
        self.adapters = {}
        self.told = set()  # distributions named in a line already


def _version_tuple(text):
    match = re.match(r"\d+(?:\.\d+)*", text)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def supported_version(name):
    """The installed version of the package behind ``name`` and whether poolscope supports it."""
    spec = SUPPORTED[name]
    version = _installed(spec["distribution"])
    if version is None:
        return None, False
    v = _version_tuple(version)
    return version, _version_tuple(spec["minimum"]) <= v < _version_tuple(spec["below"])


def _installed(distribution):
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _urllib3_is_future():
    """Whether ``import urllib3`` gives urllib3-future, which can install itself under that
    name (beside or instead of urllib3): its package has a ``backend`` that urllib3's lacks.
    Nothing is imported to tell."""
    try:
        spec = importlib.util.find_spec("urllib3")
    except (ImportError, ValueError):
        return False
    locations = (spec.submodule_search_locations if spec is not None else None) or ()
    return any(os.path.isdir(os.path.join(location, "backend")) for location in locations)


def _tell_uncovered():
    """One line naming the installed client libraries whose pools poolscope does not observe."""
    found = [f"{name} {version}" for name in UNCOVERED
             if (version := _installed(name)) is not None]
    if found:
        logger.warning("poolscope: %s installed, not observed: their connection pools report "
                       "nothing", ", ".join(found))


def _load_adapter(name):
    module, _, cls = _ADAPTER_CLASSES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def _on_import(name, owner, module):
    with _lock:
        if _active is not owner or name in owner.adapters:
            return
        checked = "urllib3-future" if name == _FUTURE_AS_URLLIB3 else name
        version, ok = supported_version(checked)
        spec = SUPPORTED[checked]
        if not ok:
            if spec["distribution"] in owner.told:
                return
            owner.told.add(spec["distribution"])
            logger.warning("poolscope: %s %s is not supported (supported: >=%s,<%s); %s pools are "
                           "not instrumented", spec["distribution"], version, spec["minimum"],
                           spec["below"], checked)
            return
        adapter = _load_adapter(name)(owner.recorder)
        try:
            adapter.patch()
        except Exception:
            adapter.unpatch()
            logger.warning("poolscope: could not instrument %s %s; its pools are not instrumented",
                           spec["distribution"], version, exc_info=True)
            return
        owner.adapters[name] = adapter


def instrument(*, meter_provider=None, tracer_provider=None, libraries=None):
    """Instrument every installed supported HTTP library, or those named in ``libraries``.

    Each library is patched when it is imported (at once if it already is). Idempotent: a
    second call while instrumented does nothing. Without providers, the global ones are used.
    """
    global _active
    with _lock:
        if _active is not None:
            return
        names = list(ADAPTERS) if libraries is None else list(libraries)
        unknown = [n for n in names if n not in ADAPTERS]
        if unknown:
            raise ValueError(f"poolscope: unknown libraries {', '.join(unknown)}; "
                             f"supported: {', '.join(ADAPTERS)}")
        setting(env_bool, "POOLSCOPE_STRICT", False)  # read at import; a bad value is told here
        recorder = Recorder(meter_provider, tracer_provider,
                            detailed=setting(env_bool, "POOLSCOPE_DETAILED_TIMINGS", False),
                            max_origins=setting(env_int, "POOLSCOPE_MAX_ORIGINS", 1000),
                            leak_after=(setting(env_seconds, "POOLSCOPE_LEAK_SECONDS", 30.0)
                                        if setting(env_bool, "POOLSCOPE_LEAK_WARNINGS", False)
                                        else None))
        _active = owner = _Instrumentation(recorder, names)
        _tell_uncovered()
        hooks = [(name, SUPPORTED[name]["module"]) for name in names]
        if _urllib3_is_future():  # either name asks for the copy niquests uses
            hooks = [hook for hook in hooks if hook[0] != "urllib3"]
            if {"urllib3", "urllib3-future"} & set(names):
                hooks.append((_FUTURE_AS_URLLIB3, SUPPORTED["urllib3-future"]["module"].replace(
                    "urllib3_future", "urllib3", 1)))
        for name, module in hooks:
            wrapt.register_post_import_hook(functools.partial(_on_import, name, owner), module)


def uninstrument():
    """Restore every patched attribute to the very object it was, and stop all hooks."""
    global _active
    with _lock:
        owner, _active = _active, None
        if owner is None:
            return
        for adapter in owner.adapters.values():
            adapter.unpatch()
        owner.adapters.clear()
        owner.recorder.close()


def current_recorder():
    """The recorder of the current instrumentation, or None."""
    return _active.recorder if _active is not None else None
