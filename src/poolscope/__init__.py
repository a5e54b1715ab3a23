"""poolscope: OpenTelemetry metrics and spans for the connection pools inside Python HTTP clients.

Public API: :func:`instrument`, :func:`uninstrument` and :class:`PoolscopeInstrumentor`.
"""

from ._instrument import instrument, uninstrument
from ._version import __version__

try:
    from opentelemetry.instrumentation.instrumentor import BaseInstrumentor as _Base
except ImportError:  # opentelemetry-instrumentation is optional
    class _Base:
        def instrument(self, **kwargs):
            self._instrument(**kwargs)

        def uninstrument(self, **kwargs):
            self._uninstrument(**kwargs)


class PoolscopeInstrumentor(_Base):
    """poolscope as an OpenTelemetry instrumentor, loaded by ``opentelemetry-instrument``."""

    def instrumentation_dependencies(self):
        return []  # every HTTP library is optional: each is instrumented when installed

    def _instrument(self, **kwargs):
        instrument(meter_provider=kwargs.get("meter_provider"),
                   tracer_provider=kwargs.get("tracer_provider"),
                   libraries=kwargs.get("libraries"))

    def _uninstrument(self, **kwargs):
        uninstrument()


__all__ = ["instrument", "uninstrument", "PoolscopeInstrumentor", "__version__"]
