"""The instruments: the histograms the recorder records into, and the observable instruments,
whose callbacks read the recorder's pools when a reader collects. Counts and gauges are
derived here, from the connections and waits the pools hold and the per-origin totals of
the ones gone; a request never calls them.
"""

import time
import weakref

from opentelemetry.metrics import Observation

from . import _semconv as sc

monotonic = time.monotonic

# meter -> {instrument name: its histogram, or the latest recorder's callback of its observable
# instrument}. OpenTelemetry keeps an observable instrument's callbacks for good and hands back
# the first instrument made with a name: a recorder on a meter that already has poolscope's
# (instrument, uninstrument, instrument again) reports through the instruments made first.
_made = weakref.WeakKeyDictionary()
# the same for the global meter provider: one for good, as OpenTelemetry's stand-in for it
# (each meter taken from it before it is set is a new object) ends up as the provider set
_made_global = {}


def make_instruments(recorder, meter, is_global):
    """Make (or take the ones made first of) ``meter``'s instruments for ``recorder``, its
    collection callbacks now the ones registered; return the histograms: wait, create, set-up
    phase, use and idle times, connection duration, requests per connection."""
    made = _made_global if is_global else _made.setdefault(meter, {})

    def histogram(spec, buckets=sc.DURATION_BUCKETS):
        name, unit, description = spec
        if name not in made:
            made[name] = meter.create_histogram(
                name, unit=unit, description=description,
                explicit_bucket_boundaries_advisory=list(buckets))
        return made[name]

    def observe(create, spec, callback):
        def reaped(options):
            recorder._reap()
            return callback(options)
        name, unit, description = spec
        if name not in made:
            create(name, callbacks=[lambda options: made[name](options)], unit=unit,
                   description=description)
        made[name] = reaped

    c = _Collector(recorder)
    updown, counter, gauge = (meter.create_observable_up_down_counter,
                              meter.create_observable_counter, meter.create_observable_gauge)
    observe(updown, sc.OPEN_CONNECTIONS, c.observe_open)
    observe(updown, sc.PENDING_REQUESTS, c.observe_pending)
    observe(updown, sc.ACTIVE_STREAMS, c.streams(0))
    observe(updown, sc.MAX_STREAMS, c.streams(1))
    observe(counter, sc.ACQUISITIONS, c.observe_acquisitions)
    observe(counter, sc.CREATED, c.origin_values(lambda s: s.created))
    observe(counter, sc.TIMEOUTS, c.origin_values(lambda s: s.waits.get(sc.TIMED_OUT, 0)))
    observe(counter, sc.WAITS, c.by(lambda s: s.waits, sc.WAIT_OUTCOME))
    observe(counter, sc.CLOSED, c.by(lambda s: s.closed, sc.CLOSE_REASON))
    observe(counter, sc.STALE_FAILURES, c.by(lambda s: s.stale, sc.RETRIED))
    observe(updown, sc.MAX, c.pool_sums(lambda p: p.max))
    observe(updown, sc.IDLE_MAX, c.pool_sums(lambda p: p.idle_max))
    observe(updown, sc.POOL_COUNT, c.pool_sums(lambda p: 1))
    observe(counter, sc.SATURATION_TIME, c.observe_saturation)
    observe(gauge, sc.OLDEST_ACTIVE_AGE, c.ages(
        lambda conn: conn.acquired_at if conn.in_use and not conn.upgraded else None,
        lambda w: None, busy=True))
    observe(gauge, sc.OLDEST_PENDING_AGE, c.ages(
        lambda conn: None, lambda w: w.start, queued=True))
    return (histogram(sc.WAIT_TIME), histogram(sc.CREATE_TIME), histogram(sc.SETUP_PHASE_TIME),
            histogram(sc.USE_TIME), histogram(sc.IDLE_TIME),
            histogram(sc.CONNECTION_DURATION, sc.LIFETIME_BUCKETS),
            histogram(sc.REQUESTS_PER_CONNECTION, sc.REQUEST_BUCKETS))


class _Collector:
    """The observable instruments' callbacks over one recorder's state, read under its lock."""

    def __init__(self, recorder):
        self.r = recorder
        self.open_keys = set()  # (series, state, protocol) reported for open connections

    def origin_series(self):
        with self.r._lock:
            return [s for s in self.r._series.values() if s.is_origin]

    def origin_values(self, value):
        def callback(options):
            return [Observation(value(s), s.attrs) for s in self.origin_series()]
        return callback

    def live_conns(self):
        """{origin series: [its live connections]}, every origin series included."""
        by_series = {s: [] for s in self.r._series.values() if s.is_origin}
        for pool in self.r._pools:
            for conn in pool.conns:
                by_series.setdefault(conn.series, []).append(conn)
        return by_series

    def queued(self):
        """(series, since) of each request a library holds back in a pool whose queue is read
        at collection (``Pool.queued``) instead of being told wait by wait."""
        for pool in self.r._pools:
            if pool.queued is not None:
                yield from pool.queued()

    def busy(self):
        """{connection: since} of the connections held by requests the adapter learns of only
        when they end (``Pool.busy``)."""
        busy = {}
        for pool in self.r._pools:
            if pool.busy is not None:
                busy.update(pool.busy())
        return busy

    def observe_pending(self, options):
        with self.r._lock:
            pending = {s: s.pending for s in self.r._series.values() if s.is_origin}
            for series, _ in self.queued():
                pending[series] = pending.get(series, 0) + 1
        return [Observation(n, s.attrs) for s, n in pending.items()]

    def observe_open(self, options):
        """Per origin, state and HTTP version (none for a connection still being set up).
        A count once reported reads 0 when it has no connection, and so does an origin with
        no connection in a state at all."""
        with self.r._lock:
            counts = dict.fromkeys(self.open_keys, 0)
            live = self.live_conns()
            busy = self.busy()
            for s, conns in live.items():
                for c in conns:
                    key = (s, sc.STATE_ACTIVE if c.active or c in busy else sc.STATE_IDLE,
                           c.protocol)
                    counts[key] = counts.get(key, 0) + 1
            self.open_keys.update(counts)
            states = {key[:2] for key in counts}
            for s in live:
                for state in (sc.STATE_ACTIVE, sc.STATE_IDLE):
                    if (s, state) not in states:
                        counts[(s, state, None)] = 0
        for (s, state, protocol), n in counts.items():
            yield Observation(n, s.attr((sc.CONNECTION_STATE, state),
                                        (sc.PROTOCOL_VERSION, protocol)))

    def streams(self, which):
        """Active streams (``which`` 0) or stream limits (1), summed over an origin's
        multiplexed connections; 0 for an origin that had such connections and has none."""
        def callback(options):
            with self.r._lock:
                sums = {s: 0 for s in self.r._series.values() if s.multiplexed}
                for pool in self.r._pools:
                    for conn in pool.conns:
                        if conn.streams is not None and not conn.closed:
                            sums[conn.series] += conn.streams()[which]
            return [Observation(n, s.attrs) for s, n in sums.items()]
        return callback

    def observe_acquisitions(self, options):
        with self.r._lock:
            values = []
            for s, conns in self.live_conns().items():
                # An acquisition undone (httpcore's ConnectionNotAvailable) must not make
                # the exported counter go backwards: report the high-water mark.
                seen = s.acquired_seen
                reused = s.acquired[1] + sum(c.reuses for c in conns)
                seen[0], seen[1] = max(seen[0], s.acquired[0]), max(seen[1], reused)
                values.append((s, seen[0], seen[1]))
        for s, new, reused in values:
            yield Observation(new, s.attr((sc.REUSED, False)))
            yield Observation(reused, s.attr((sc.REUSED, True)))

    def by(self, counts, attribute):
        """A counter kept per origin as {attribute value: count}."""
        def callback(options):
            with self.r._lock:
                values = [(s, dict(counts(s))) for s in self.r._series.values() if s.is_origin]
            return [Observation(n, s.attr((attribute, value)))
                    for s, by in values for value, n in by.items()]
        return callback

    def pool_sums(self, value):
        def callback(options):
            with self.r._lock:
                # a scope that ever had such a pool reads 0 when they are gone, not nothing
                sums = {s: 0 for s, values in self.r._scopes.items() if value(values) is not None}
                for pool in self.r._pools:
                    v = value(pool)
                    if pool.live and v is not None:
                        sums[pool.scope] = sums.get(pool.scope, 0) + v
            return [Observation(v, s.attrs) for s, v in sums.items()]
        return callback

    def observe_saturation(self, options):
        now = monotonic()
        with self.r._lock:
            totals = {s: s.saturated for s in self.r._series.values() if s.saturated}
            for pool in self.r._pools:
                if pool.max is not None:
                    since = pool.sat_since
                    ongoing = pool.saturated + (now - since if since is not None else 0.0)
                    totals[pool.scope] = totals.get(pool.scope, pool.scope.saturated) + ongoing
            for s, total in totals.items():
                # A saturation that ends is closed at the time its event read the clock, which
                # can be before this collection's: the counter must not go backwards, so it
                # reports its high-water mark (time moves on past it).
                s.saturated_seen = totals[s] = max(s.saturated_seen, total)
        return [Observation(v, s.attrs) for s, v in totals.items()]

    def ages(self, conn_start, wait_start, queued=False, busy=False):
        """Age of the oldest item per origin; 0 for an origin with none."""
        def callback(options):
            now = monotonic()
            with self.r._lock:
                oldest = {s: now for s in self.r._series.values() if s.is_origin}
                for pool in self.r._pools:
                    for items, start_of in ((pool.conns, conn_start), (pool.waits, wait_start)):
                        for item in items:
                            start = start_of(item)
                            if start is not None and start < oldest.get(item.series, now):
                                oldest[item.series] = start
                for series, start in self.queued() if queued else ():
                    if start < oldest.get(series, now):
                        oldest[series] = start
                for conn, start in self.busy().items() if busy else ():
                    if not conn.closed and start < oldest.get(conn.series, now):
                        oldest[conn.series] = start
            return [Observation(now - start, s.attrs) for s, start in oldest.items()]
        return callback
