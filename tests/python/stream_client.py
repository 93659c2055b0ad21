"""Drives podvisord's WebSocket streaming server with PyPI's `kubernetes` client (its
`kubernetes.stream.ws_client`), an implementation that is not podvisor's: the e2e tests
run it from a cached venv (tests/src/python.rs) and read one JSON object from stdout.

  stream_client.py exec URL [STDIN_BYTES]   exec/attach; STDIN_BYTES random bytes sent on
                                            stdin, then stdin closed (v5) -> stdout/stderr
                                            sha256 and text, the return code, the protocol
  stream_client.py portforward URL PORT REQUEST [READ_BYTES]
                                            one connection to PORT: REQUEST sent, the answer
                                            read to its end -> its sha256, size, head, the
                                            error channel
"""

import hashlib
import json
import os
import sys
import threading

from kubernetes.client import Configuration
from kubernetes.stream.ws_client import (
    ERROR_CHANNEL,
    STDERR_CHANNEL,
    STDOUT_CHANNEL,
    PortForward,
    WSClient,
    create_websocket,
    get_websocket_url,
)

CHUNK = 64 * 1024


def exec_session(url, stdin_bytes):
    client = WSClient(Configuration(), get_websocket_url(url), None, True, binary=True)
    sent = hashlib.sha256()
    if stdin_bytes:
        data = os.urandom(stdin_bytes)
        sent.update(data)

        # A thread sends while this one reads: a process echoing its input blocks when its
        # output is not read.
        def feed():
            for i in range(0, len(data), CHUNK):
                client.write_stdin(data[i:i + CHUNK])
            client.close_channel(0)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
    stdout, stderr = bytearray(), bytearray()
    while client.is_open():
        client.update(timeout=1)
        stdout += client.read_channel(STDOUT_CHANNEL) or b""
        stderr += client.read_channel(STDERR_CHANNEL) or b""
    stdout += client.read_channel(STDOUT_CHANNEL) or b""
    stderr += client.read_channel(STDERR_CHANNEL) or b""
    error = client.peek_channel(ERROR_CHANNEL)
    try:
        code = client.returncode
    except Exception as e:  # a status without an exit code
        code = None
        error = error or str(e).encode()
    return {
        "protocol": client.subprotocol,
        "sent_sha256": sent.hexdigest() if stdin_bytes else None,
        "stdout_sha256": hashlib.sha256(stdout).hexdigest(),
        "stdout_len": len(stdout),
        "stdout": stdout[:4096].decode("utf-8", "replace"),
        "stderr": stderr[:4096].decode("utf-8", "replace"),
        "error": (error or b"").decode("utf-8", "replace"),
        "returncode": code,
    }


def portforward_session(url, port, request):
    sep = "&" if "?" in url else "?"
    ws = create_websocket(Configuration(), get_websocket_url(f"{url}{sep}ports={port}"), None)
    pf = PortForward(ws, [port])
    sock = pf.socket(port)
    sock.sendall(request.encode())
    answer = bytearray()
    while True:
        chunk = sock.recv(CHUNK)
        if not chunk:
            break
        answer += chunk
    sock.close()
    head_end = answer.find(b"\r\n\r\n")
    body = answer[head_end + 4:] if head_end >= 0 else b""
    return {
        "sha256": hashlib.sha256(answer).hexdigest(),
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "len": len(answer),
        "head": answer[:200].decode("utf-8", "replace"),
        "error": pf.error(port),
    }


def main():
    mode, url = sys.argv[1], sys.argv[2]
    if mode == "exec":
        out = exec_session(url, int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    elif mode == "portforward":
        out = portforward_session(url, int(sys.argv[3]), sys.argv[4])
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
