"""Supported libraries as plain data (no imports): read by the adapters, the docs and the test matrix.

``distribution`` is the package whose version is checked; ``module`` is the import that triggers
patching; versions are ``minimum <= v < below``.
"""

SUPPORTED = {
    "urllib3": {"distribution": "urllib3", "module": "urllib3.connectionpool",
                "minimum": "1.26", "below": "3"},
    "httpx": {"distribution": "httpcore", "module": "httpcore",
              "minimum": "1.0.3", "below": "2"},
    "httpx2": {"distribution": "httpcore2", "module": "httpcore2",
               "minimum": "2.0", "below": "3"},
    "aiohttp": {"distribution": "aiohttp", "module": "aiohttp.connector",
                "minimum": "3.10.11", "below": "4"},
    "pycurl": {"distribution": "pycurl", "module": "pycurl",
               "minimum": "7.46", "below": "8"},
    # the last of its pool modules the package imports (its sync and async twins both done)
    "urllib3-future": {"distribution": "urllib3-future", "module": "urllib3_future._async.poolmanager",
                       "minimum": "2.20", "below": "3"},
    "curl_cffi": {"distribution": "curl_cffi", "module": "curl_cffi",
                  "minimum": "0.13", "below": "0.18"},
}

# Client libraries with connection pools poolscope does not observe (yet): when one is installed,
# instrument() says so in one line, so that nobody wonders why its pools report nothing.
# Each keeps connections it reuses: geventhttpclient's ConnectionPool, aiosonic's pools, httplib2's
# connection per origin, twisted's HTTPConnectionPool (treq, scrapy), asks' sessions, zapros'
# per-host pools, the Rust clients' (hyper/reqwest) pools and tls-client's (Go's net/http).
UNCOVERED = ("aiosonic", "asks", "geventhttpclient", "httplib2", "httpr", "primp", "pyreqwest",
             "requestx", "rnet", "tls-client", "twisted", "wreq", "zapros")
