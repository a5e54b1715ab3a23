"""The pool report: a short table per pool, from the same metrics poolscope exports, with advice."""

import os

from . import _semconv as sc

# The setting that raises each library's connection limit, and its keep-alive expiry.
LIMIT_SETTING = {"urllib3": "maxsize (requests: HTTPAdapter pool_maxsize; botocore: max_pool_connections)",
                 "httpx": "httpx.Limits(max_connections=...)",
                 "httpx2": "httpx2.Limits(max_connections=...) (openai/anthropic: http_client="
                           "DefaultHttpxClient(limits=...))",
                 "aiohttp": "TCPConnector(limit=..., limit_per_host=...)",
                 "pycurl": "the multi's M_MAX_TOTAL_CONNECTIONS / M_MAX_HOST_CONNECTIONS",
                 "urllib3-future": "HTTPAdapter(pool_maxsize=...) (niquests: Session(pool_maxsize="
                                   "...), AsyncSession(pool_maxsize=...); urllib3-future: maxsize)",
                 "curl_cffi": "AsyncSession(max_clients=...)"}
KEEPALIVE_SETTING = {"httpx": "httpx.Limits(keepalive_expiry=...)",
                     "httpx2": "httpx2.Limits(keepalive_expiry=...)",
                     "aiohttp": "TCPConnector(keepalive_timeout=...)",
                     "pycurl": "MAXAGE_CONN",
                     "urllib3-future": "keepalive_delay (niquests: Session(keepalive_delay=...))",
                     "curl_cffi": "curl_options={CurlOpt.MAXAGE_CONN: ...}"}
IDLE_SETTING = {"httpx": "httpx.Limits(max_keepalive_connections=...)",
                "httpx2": "httpx2.Limits(max_keepalive_connections=...)",
                "aiohttp": "TCPConnector(force_close=False)",
                "pycurl": "MAXCONNECTS / M_MAXCONNECTS, or drop FORBID_REUSE",
                "curl_cffi": "curl_options={CurlOpt.MAXCONNECTS: ...}"}


def _key(attrs):
    if sc.SERVER_ADDRESS in attrs:
        return (attrs[sc.LIBRARY], attrs.get(sc.URL_SCHEME), attrs[sc.SERVER_ADDRESS],
                attrs.get(sc.SERVER_PORT))
    return (attrs.get(sc.LIBRARY),)


def collect(metrics_data):
    """{series key: {metric name or (name, attribute value): value or histogram point}}."""
    figures = {}
    for rm in metrics_data.resource_metrics if metrics_data else ():
        for sm in rm.scope_metrics:
            if sm.scope.name != sc.INSTRUMENTATION_NAME:
                continue
            for metric in sm.metrics:
                for point in metric.data.data_points:
                    attrs = dict(point.attributes)
                    extra = (attrs.get(sc.CLOSE_REASON) if metric.name == sc.CLOSED[0] else
                             attrs.get(sc.REUSED) if metric.name == sc.ACQUISITIONS[0] else
                             attrs.get(sc.WAIT_OUTCOME) if metric.name == sc.WAITS[0] else
                             attrs.get(sc.RETRIED) if metric.name == sc.STALE_FAILURES[0] else
                             attrs.get(sc.SETUP_PHASE) if metric.name == sc.SETUP_PHASE_TIME[0] else
                             attrs.get(sc.CONNECTION_STATE))
                    name = metric.name if extra is None else (metric.name, extra)
                    found = figures.setdefault(_key(attrs), {})
                    if hasattr(point, "bucket_counts"):
                        found[name] = point
                    else:  # points apart only by what the report does not read (the version)
                        found[name] = found.get(name, 0) + point.value
    return figures


def quantile(point, q):
    """Estimate a quantile from a histogram point, as Prometheus does, kept within [min, max]."""
    if point is None or not point.count:
        return None
    rank = q * point.count
    bounds = list(point.explicit_bounds)
    seen, lower = 0, 0.0
    for i, count in enumerate(point.bucket_counts):
        upper = bounds[i] if i < len(bounds) else point.max
        if count and seen + count >= rank:
            estimate = lower + (upper - lower) * (rank - seen) / count
            return min(max(estimate, point.min), point.max)
        seen += count
        lower = upper
    return point.max


def _seconds(value):
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def render(metrics_data, scopes, leak_after=30.0):
    """The report text. ``scopes`` is ``Recorder.scopes()`` (limits, peaks, pools opened);
    a connection held, or a request waiting, ``leak_after`` seconds or more is flagged."""
    figures = collect(metrics_data)
    scope_info = {s.key: info for s, info in scopes.items()}
    origins = sorted(k for k in figures if len(k) > 1)
    if not origins:
        return f"poolscope: no HTTP connection pool was used in process {os.getpid()}.\n"
    lines = [f"poolscope pool report (process {os.getpid()})"]
    for key in origins:
        library, scheme, host, port = key
        f = figures[key]
        own_scope = key in scope_info
        scope = key if own_scope else (library,)
        limit, peak, pools_opened = scope_info.get(scope, (None, 0, 0))
        saturated = figures.get(scope, {}).get(sc.SATURATION_TIME[0], 0.0)
        origin = f"{scheme}://{host}" + (f":{port}" if port else "")
        new = f.get((sc.ACQUISITIONS[0], False), 0)
        reused = f.get((sc.ACQUISITIONS[0], True), 0)
        total = new + reused
        wait = f.get(sc.WAIT_TIME[0])
        waited = wait.count if wait is not None else 0
        timeouts = f.get(sc.TIMEOUTS[0], 0)
        cancelled = f.get((sc.WAITS[0], sc.CANCELLED), 0)
        stale = (f.get((sc.STALE_FAILURES[0], True), 0), f.get((sc.STALE_FAILURES[0], False), 0))
        served = f.get(sc.REQUESTS_PER_CONNECTION[0])
        created = f.get(sc.CREATED[0], 0)
        closes = {r: f[(sc.CLOSED[0], r)] for r in sc.CLOSE_REASONS if f.get((sc.CLOSED[0], r))}
        pool_word = "pool" if own_scope else f"{library} client pools (all origins)"
        lines.append(f"\n{library} {origin}")
        lines.append(f"  {pool_word}: limit {limit if limit is not None else 'none'}, "
                     f"peak {peak} in use, saturated {_seconds(saturated)}, "
                     f"{pools_opened} pool(s) created")
        lines.append(f"  requests: {total} acquisitions, {waited} waited"
                     + (f" (p50 {_seconds(quantile(wait, 0.5))}, p99 {_seconds(quantile(wait, 0.99))})"
                        if waited else "")
                     + f", {timeouts} timed out"
                     + (f", {cancelled} cancelled while waiting" if cancelled else "")
                     + (f", {sum(stale)} failed on a connection the server had closed "
                        f"({stale[0]} sent again)" if sum(stale) else ""))
        streams = f.get(sc.MAX_STREAMS[0])  # an origin with HTTP/2 connections
        lines.append(f"  connections: {created} created, reuse {100 * reused / total if total else 0:.0f}%, "
                     f"open {f.get((sc.OPEN_CONNECTIONS[0], sc.STATE_ACTIVE), 0)} active / "
                     f"{f.get((sc.OPEN_CONNECTIONS[0], sc.STATE_IDLE), 0)} idle, closed: "
                     + (", ".join(f"{r} {n}" for r, n in closes.items()) or "none")
                     + (f"; {served.sum / served.count:.1f} requests per closed connection"
                        if served and served.count else "")
                     + (f"; HTTP/2 streams {f.get(sc.ACTIVE_STREAMS[0], 0)} active of {streams} "
                        "allowed" if streams is not None else ""))
        create = f.get(sc.CREATE_TIME[0])
        phases = {p: f[(sc.SETUP_PHASE_TIME[0], p)] for p in sc.SETUP_PHASE_SPANS
                  if (sc.SETUP_PHASE_TIME[0], p) in f}
        if create is not None and create.count:
            lines.append(f"  set-up: {_seconds(create.sum / create.count)} on average"
                         + (" (" + ", ".join(f"{p} {_seconds(pt.sum / pt.count)}"
                                             for p, pt in phases.items()) + ")" if phases else ""))
        handshake = phases.get(sc.TLS)
        for line in stuck(f.get(sc.OLDEST_ACTIVE_AGE[0]), f.get(sc.OLDEST_PENDING_AGE[0]),
                          leak_after):
            lines.append(f"  WARNING: {line}")
        for line in advise(library, total, waited, timeouts, limit, peak, pools_opened, reused,
                           closes, wait, stale, http2=streams is not None,
                           handshake=handshake.sum / handshake.count if handshake else None):
            lines.append(f"  advice: {line}")
    return "\n".join(lines) + "\n"


def stuck(active_age, pending_age, leak_after):
    """Warnings for a connection held, or a request waiting, ``leak_after`` seconds or more."""
    warnings = []
    if active_age is not None and active_age >= leak_after:
        warnings.append(f"a connection has been held for {_seconds(active_age)} and is still not "
                        "returned: a response that is never closed keeps its connection (a stream "
                        "read outside `with`, an unread preload_content=False response, an aiohttp "
                        "response never released). Run with POOLSCOPE_LEAK_WARNINGS=true to log "
                        "where it was acquired.")
    if pending_age is not None and pending_age >= leak_after:
        warnings.append(f"a request has been waiting {_seconds(pending_age)} for a connection: "
                        "the pool has stopped handing out connections, because every connection "
                        "is held (see leaks above) or the pool is stuck.")
    return warnings


def advise(library, total, waited, timeouts, limit, peak, pools_opened, reused, closes, wait,
           stale=(0, 0), http2=False, handshake=None):
    """Plain-language advice for the figures of one origin; ``stale``: requests failed on a
    connection the server had closed, (sent again by the library, not); ``http2``: the origin's
    connections are HTTP/2, where requests wait for a stream; ``handshake``: the mean seconds
    of a new connection's TLS handshake."""
    advice = []
    if sum(stale):
        expiry = KEEPALIVE_SETTING.get(library)
        advice.append(f"{sum(stale)} requests failed on a reused connection the server had "
                      f"already closed ({stale[1]} of them reached the application): "
                      + (f"set {expiry} below the server's keep-alive timeout"
                         if expiry else "keep connections idle for less than the server's "
                                        "keep-alive timeout")
                      + (", and retry idempotent requests." if stale[1] else "."))
    setting = LIMIT_SETTING.get(library, "the pool's connection limit")
    if waited and http2:
        advice.append(f"{waited} of {total} requests waited for an HTTP/2 stream "
                      f"(p99 {_seconds(quantile(wait, 0.99))}): the server allows only so many "
                      "at once on a connection, and httpcore sends all of an origin's requests "
                      "on one HTTP/2 connection; send fewer requests at once, or use HTTP/1.1 "
                      f"(http2=False) with {setting} above the requests in flight.")
    elif waited and limit is not None:
        advice.append(f"{waited} of {total} requests waited for a connection "
                      f"(p99 {_seconds(quantile(wait, 0.99))}) with all {limit} in use: raise "
                      f"{setting} above {peak}, or send fewer requests at once.")
    if timeouts:
        advice.append(f"{timeouts} requests gave up waiting for the pool: raise the limit or the "
                      "pool timeout, and look for responses held open (streams not closed).")
    if closes.get(sc.POOL_FULL):
        advice.append(f"{closes[sc.POOL_FULL]} connections were discarded because the pool was "
                      f"full (\"Connection pool is full\"): raise {setting} to at least {peak}, "
                      "the number of requests in flight at once.")
    if closes.get(sc.SERVER_CLOSED):
        expiry = KEEPALIVE_SETTING.get(library)
        advice.append(f"{closes[sc.SERVER_CLOSED]} connections were closed by the server "
                      "(stale keep-alive or Connection: close)"
                      + (f": set {expiry} below the server's keep-alive timeout." if expiry else
                         ": enable retries for idempotent requests, and keep the server's "
                         "keep-alive timeout longer than the client's idle periods."))
    if closes.get(sc.ERROR) and closes[sc.ERROR] * 4 >= total:
        advice.append(f"{closes[sc.ERROR]} connections were closed because a request on them "
                      "failed or its response was closed before its end (a stream not read to "
                      "the end, a cancelled or timed-out request): read responses to the end "
                      "before closing them, and look at the requests that failed.")
    if closes.get(sc.IDLE_LIMIT) and closes[sc.IDLE_LIMIT] * 4 >= total:
        advice.append(f"{closes[sc.IDLE_LIMIT]} idle connections were closed because the pool "
                      f"kept too few: raise {IDLE_SETTING.get(library, 'its idle limit')}.")
    if handshake is not None and handshake >= 0.05 and total >= 4 and reused * 2 < total:
        advice.append(f"{total - reused} of {total} requests opened a new connection, whose "
                      f"TLS handshake took {_seconds(handshake)} on average: keep connections "
                      "for reuse (one client for the process, idle connections kept, a "
                      "keep-alive expiry longer than the gaps between requests).")
    if pools_opened >= 10 and total and reused * 2 < total:
        advice.append(f"{pools_opened} pools were created for few requests each: the application "
                      "makes a client per request; create one client and reuse it.")
    return advice
