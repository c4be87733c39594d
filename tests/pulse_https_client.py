"""A client that behaves as Pulse's HTTP client for the proxy's HTTPS mode (Pulse v4.31..v5.0.17).

Written from the described behaviour, not from Pulse's code:
* per PVE instance a proxy URL (https://HOST:8443) and a token; per node
  `GET {url}/temps?node={node name}` with `Authorization: Bearer {token}` and
  `Accept: application/json`;
* TLS 1.2 or later with certificate verification off (the proxy's certificate is self-signed);
  HTTP/1.1 with keep-alive (one connection reused across requests);
* 200 carries {"node": ..., "temperature": "<sensors JSON as a string>"}; 401 (bad token) and
  403 (node not allowed) are not retried; 429 and 5xx are retried, 3 attempts in all, waiting
  100 ms x 2^n between them; any other status is an error showing its body;
* `GET {url}/health` with the same headers: 200 means healthy.
"""
import http.client
import ssl
import time
import urllib.parse

import gojson  # Pulse decodes answers with Go's encoding/json


class ProxyError(Exception):
    def __init__(self, status, message, retryable):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.retryable = status, message, retryable


class PulseHttpClient:
    ATTEMPTS = 3
    BACKOFF = 0.1

    def __init__(self, url, token, source_address=None, timeout=15.0):
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 8443
        self.token, self.timeout, self.source_address = token, timeout, source_address
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.check_hostname = False
        self.context.verify_mode = ssl.CERT_NONE
        self.conn = None
        self.attempts = 0           # requests sent, retries included

    def _connection(self):
        if self.conn is None:
            self.conn = http.client.HTTPSConnection(self.host, self.port, context=self.context,
                                                    timeout=self.timeout,
                                                    source_address=self.source_address)
        return self.conn

    def get(self, path):
        """(status, body bytes) of one GET over the kept-alive connection."""
        conn = self._connection()
        self.attempts += 1
        try:
            conn.request("GET", path, headers={"Authorization": f"Bearer {self.token}",
                                               "Accept": "application/json"})
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        if response.will_close:
            self.close()
        return response.status, body

    def temperature(self, node):
        """The node's sensors JSON (parsed), or ProxyError after Pulse's retries."""
        path = "/temps?" + urllib.parse.urlencode({"node": node})
        for attempt in range(self.ATTEMPTS):
            status, body = self.get(path)
            if status == 200:
                data = gojson.decode(body.decode())
                return gojson.decode(data["temperature"])
            if status == 401:
                raise ProxyError(status, "invalid token", retryable=False)
            if status == 403:
                raise ProxyError(status, "node not allowed", retryable=False)
            error = ProxyError(status, body.decode(errors="replace").strip(),
                               retryable=status == 429 or status >= 500)
            if not error.retryable:
                raise error
            if attempt + 1 < self.ATTEMPTS:
                time.sleep(self.BACKOFF * 2 ** attempt)
        raise error

    def healthy(self):
        return self.get("/health")[0] == 200

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None
