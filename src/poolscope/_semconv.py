"""Every name, unit and bucket boundary poolscope emits, in one place (contract v1)."""

INSTRUMENTATION_NAME = "poolscope"

# Attributes
LIBRARY = "poolscope.library"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
URL_SCHEME = "url.scheme"
CONNECTION_STATE = "http.connection.state"
CLOSE_REASON = "poolscope.close.reason"
REUSED = "poolscope.connection.reused"
NETWORK_PEER_ADDRESS = "network.peer.address"
WAIT_OUTCOME = "poolscope.wait.outcome"
RETRIED = "poolscope.request.retried"
PROTOCOL_VERSION = "network.protocol.version"  # "1.1", "2", "3"
SETUP_PHASE = "poolscope.setup.phase"

STATE_ACTIVE = "active"
STATE_IDLE = "idle"
OTHER_ORIGIN = "_other"

# Close reasons
KEEPALIVE_EXPIRED = "keepalive_expired"
IDLE_LIMIT = "idle_limit"
POOL_FULL = "pool_full"
SERVER_CLOSED = "server_closed"
ERROR = "error"
POOL_CLOSED = "pool_closed"
EVICTED = "evicted"
UPGRADED = "upgraded"  # left HTTP (101 Switching Protocols: a WebSocket), closed with it
CLOSE_REASONS = (KEEPALIVE_EXPIRED, IDLE_LIMIT, POOL_FULL, SERVER_CLOSED, ERROR, POOL_CLOSED, EVICTED,
                 UPGRADED)

# Wait outcomes
GRANTED = "granted"
TIMED_OUT = "timed_out"
CANCELLED = "cancelled"
WAIT_OUTCOMES = (GRANTED, TIMED_OUT, CANCELLED)

# Set-up phases, and the span each is in a trace (.NET's names)
DNS = "dns"
CONNECT = "connect"
TLS = "tls"
SETUP_PHASE_SPANS = {DNS: "DNS lookup", CONNECT: "socket connect", TLS: "TLS handshake"}

# Metrics: (name, unit, description)
OPEN_CONNECTIONS = ("http.client.open_connections", "{connection}",
                    "Connections open in a pool, by state (active or idle)")
CONNECTION_DURATION = ("http.client.connection.duration", "s",
                       "Lifetime of a connection, from established to closed")
PENDING_REQUESTS = ("poolscope.connection.pending_requests", "{request}",
                    "Requests waiting for a connection right now")
ACTIVE_STREAMS = ("poolscope.connection.active_streams", "{stream}",
                  "HTTP/2 streams open on a pool's connections right now")
MAX_STREAMS = ("poolscope.connection.max_streams", "{stream}",
               "Concurrent streams the server allows, summed over open HTTP/2 connections")
ACQUISITIONS = ("poolscope.connection.acquisitions", "{acquisition}",
                "Connections handed to requests, new or reused")
WAIT_TIME = ("poolscope.connection.wait_time", "s",
             "Time an acquisition waited for a connection or a slot to open one")
CREATE_TIME = ("poolscope.connection.create_time", "s",
               "Time to establish a new connection (TCP connect, plus TLS where used)")
SETUP_PHASE_TIME = ("poolscope.connection.setup_phase_time", "s",
                    "Time a phase of a new connection's set-up took: name resolution (dns), TCP "
                    "connect (connect) or TLS handshake (tls)")
USE_TIME = ("poolscope.connection.use_time", "s",
            "Time from acquisition to release back to the pool (detailed timings)")
IDLE_TIME = ("poolscope.connection.idle_time", "s",
             "Time a connection sat idle in the pool before it was reused (detailed timings)")
CREATED = ("poolscope.connection.created", "{connection}", "New connections opened")
CLOSED = ("poolscope.connection.closed", "{connection}", "Connections closed, by reason")
TIMEOUTS = ("poolscope.connection.timeouts", "{timeout}",
            "Acquisitions that gave up waiting for a connection")
WAITS = ("poolscope.connection.waits", "{wait}",
         "Waits for a connection that ended, by outcome: granted, timed_out or cancelled")
STALE_FAILURES = ("poolscope.connection.stale_failures", "{failure}",
                  "Requests that failed on a reused connection the server had closed, by whether "
                  "the library sent them again")
REQUESTS_PER_CONNECTION = ("poolscope.connection.requests", "{request}",
                           "Requests a connection served in its lifetime, recorded at its close")
MAX = ("poolscope.connection.max", "{connection}",
       "Configured connection limit, summed over live pools")
IDLE_MAX = ("poolscope.connection.idle.max", "{connection}",
            "Configured limit of idle (keep-alive) connections, summed over live pools")
POOL_COUNT = ("poolscope.pool.count", "{pool}", "Live pools")
SATURATION_TIME = ("poolscope.pool.saturation_time", "s",
                   "Time during which a pool had every connection slot in use")
OLDEST_ACTIVE_AGE = ("poolscope.connection.oldest_active_age", "s",
                     "How long the longest-held active connection has been held")
OLDEST_PENDING_AGE = ("poolscope.connection.oldest_pending_age", "s",
                      "How long the longest-waiting request has been waiting")

# Seconds, from 100 µs to 5 minutes.
DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Connection lifetimes run longer: up to an hour.
LIFETIME_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                    600.0, 1800.0, 3600.0)
# Requests per connection: one (no reuse) to ten thousand.
REQUEST_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)

# Spans
SPAN_WAIT = "HTTP wait_for_connection"
SPAN_SETUP = "HTTP connection_setup"
POOL_ACTIVE = "poolscope.pool.active"
POOL_IDLE = "poolscope.pool.idle"
POOL_PENDING = "poolscope.pool.pending"
POOL_MAX = "poolscope.pool.max"
POOL_SNAPSHOT = (POOL_ACTIVE, POOL_IDLE, POOL_PENDING, POOL_MAX)
SPAN_ATTRIBUTES = (LIBRARY, SERVER_ADDRESS, SERVER_PORT)
SPAN_REUSED = "poolscope.connection.reused"
SPAN_WAIT_TIME = "poolscope.connection.wait_time"
SPAN_IDLE_TIME = "poolscope.connection.idle_time"
EVENT_CLOSED = "poolscope.connection.closed"
EVENT_EXCEPTION = "exception"
EXCEPTION_TYPE = "exception.type"
EXCEPTION_MESSAGE = "exception.message"
