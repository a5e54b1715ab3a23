"""The spans poolscope makes, for the recorder: a request's wait for a connection, a connection's
set-up and its phases, and what they add to the request's span (the wait time, a link to the
set-up). The recorder decides when, from the pool events; this module says how. A span is made
only under a recording span of the application's.
"""

import re

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.trace import Span as _SdkSpan
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation import _SPAN_KEY

from . import _semconv as sc


def _context_reader():
    """The function giving the current OpenTelemetry context. Where OpenTelemetry's default
    runtime context is in use it is the context variable's own ``get``, two Python calls fewer
    than ``context.get_current()``; every request reads it."""
    try:
        from opentelemetry.context import _RUNTIME_CONTEXT
        from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
        if type(_RUNTIME_CONTEXT) is ContextVarsRuntimeContext:
            return _RUNTIME_CONTEXT._current_context.get
    except (ImportError, AttributeError):
        pass
    return otel_context.get_current


current_context = _context_reader()


def recording_span(context=None):
    """The current span (or ``context``'s) if it is recording, else None."""
    span = (current_context() if context is None else context).get(_SPAN_KEY)
    return span if span is not None and span.is_recording() else None


_URL = re.compile(r"""(\b[a-zA-Z][\w+.-]*://)(?:[^/@\s'"]*@)?([^/?#\s'"]*)[^\s'"]*""")
_PATH = re.compile(r"""(?<![\w.:/])/[^\s'"]*""")

_SDK_ADD_LINK = _SdkSpan.add_link
_NO_ATTRIBUTES = BoundedAttributes(immutable=True)


def _add_link(span, link):
    """Add ``link``, built once for its connection, to ``span``. An SDK span takes it as built
    (its ``_add_link``), where ``add_link`` builds a new Link and attribute set for each
    request: 8,400 instructions against 19,700 (opentelemetry-sdk 1.45)."""
    if type(span).add_link is _SDK_ADD_LINK:
        span._add_link(link)
    else:
        span.add_link(link.context)


def _record_error(span, error):
    """An ``exception`` event with the type and message, every URL in the message cut to its
    origin and every path to ``/…`` (no user info, path or query), and no stack trace."""
    message = _PATH.sub("/…", _URL.sub(r"\1\2", str(error)))
    span.add_event(sc.EVENT_EXCEPTION, {sc.EXCEPTION_TYPE: type(error).__name__,
                                        sc.EXCEPTION_MESSAGE: message})


def _span_attrs(series):
    return {k: v for k, v in series.attrs.items() if k in sc.SPAN_ATTRIBUTES}


class Tracing:
    """The recorder's span methods (``_tracer``: its tracer)."""

    @staticmethod
    def context():
        """The current context if a recording span is current, else None: for adapters whose
        library runs a request outside the context it was made in (a pycurl multi)."""
        return otel_context.get_current() if recording_span() is not None else None

    @staticmethod
    def link(span, conn):
        """Link a request's span to the set-up span of the connection that served it (the
        request that set it up was linked at :meth:`setup_started`)."""
        if conn.setup is not None and conn.setup_by != span.get_span_context().span_id:
            _add_link(span, conn.setup)

    def setup_started(self, conn, context=None, start_ns=None):
        """An ``HTTP connection_setup`` span for ``conn`` if a recording span is current (or in
        ``context``); that span, and each later request's on the connection, links to it."""
        parent = recording_span(context)
        if parent is None:
            return None
        span = self._tracer.start_span(sc.SPAN_SETUP, context=context, kind=SpanKind.INTERNAL,
                                       attributes=_span_attrs(conn.series), start_time=start_ns)
        conn.setup = trace.Link(span.get_span_context(), _NO_ATTRIBUTES)
        conn.setup_by = parent.get_span_context().span_id
        _add_link(parent, conn.setup)
        return span

    @staticmethod
    def setup_ended(span, error=None, peer=None, end_ns=None):
        """End a span from :meth:`setup_started` (a no-op for None)."""
        if span is None:
            return
        try:
            if peer:
                span.set_attribute(sc.NETWORK_PEER_ADDRESS, peer)
            if error is not None:
                span.set_status(StatusCode.ERROR, type(error).__name__)
                _record_error(span, error)
        finally:
            span.end(end_time=end_ns)

    def _phase_spans(self, conn, phases):
        """Each of ``phases`` (``(phase, seconds, end_ns)``) a child span of ``conn``'s traced
        ``HTTP connection_setup`` span."""
        parent = trace.set_span_in_context(trace.NonRecordingSpan(conn.setup.context))
        for phase, seconds, end_ns in phases:
            span = self._tracer.start_span(sc.SETUP_PHASE_SPANS[phase], context=parent,
                                           kind=SpanKind.INTERNAL,
                                           attributes=_span_attrs(conn.series),
                                           start_time=end_ns - int(seconds * 1e9))
            span.end(end_time=end_ns)

    def _wait_span(self, series, snapshot=(), context=None, start_ns=None):
        """An ``HTTP wait_for_connection`` span; ``snapshot``: the pool's
        :data:`~poolscope._semconv.POOL_SNAPSHOT` values when the wait began (None: unknown)."""
        return self._tracer.start_span(
            sc.SPAN_WAIT, context=context, kind=SpanKind.INTERNAL, start_time=start_ns,
            attributes={**_span_attrs(series), **{k: v for k, v in zip(sc.POOL_SNAPSHOT, snapshot)
                                                  if v is not None}})

    @staticmethod
    def _end_wait_span(span, parent, outcome, seconds, error, end_ns):
        """End the wait's span (if any); a granted wait's time goes on the request's span."""
        if outcome == sc.GRANTED and parent is not None and parent.is_recording():
            parent.set_attribute(sc.SPAN_WAIT_TIME, seconds)
        if span is None:
            return
        span.set_attribute(sc.WAIT_OUTCOME, outcome)
        if outcome == sc.TIMED_OUT:
            span.set_status(StatusCode.ERROR, "pool timeout: no connection within the timeout")
            if error is not None:
                _record_error(span, error)
        span.end(end_time=end_ns)
