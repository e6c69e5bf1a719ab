"""An application sending into a cell with a real oslo.messaging RPC client.

    client.py URL call|cast MESSAGE_TYPE CELLS_MESSAGE_JSON [TIMEOUT [CALL_MONITOR_TIMEOUT]]

Casts or calls `process_message(message=...)` on `cells.intercell.<type>`,
as nova-cells' rpc driver does, and for a call prints the result as JSON
(20 s timeout, no call monitoring unless given). A call that raises prints
`{"error": <class>, "exc_type": <remote class>, "value": <text>}` instead.
The call's duration goes to standard error as `elapsed=<seconds>`.
"""
import json
import sys
import time

from oslo_config import cfg
import oslo_messaging as messaging


def main():
    url, mode, message_type, message = sys.argv[1:5]
    messaging.set_transport_defaults("nova")
    conf = cfg.CONF
    conf([], project="cellhost-interop")
    transport = messaging.get_rpc_transport(conf, url=url)
    target = messaging.Target(topic="cells.intercell.%s" % message_type)
    client = messaging.get_rpc_client(transport, target)
    ctxt = json.loads(message)["ctxt"]
    timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 20
    monitor = float(sys.argv[6]) if len(sys.argv) > 6 else None
    if mode == "call":
        prepared = client.prepare(timeout=timeout, call_monitor_timeout=monitor)
        started = time.monotonic()
        try:
            result = prepared.call(ctxt, "process_message", message=message)
        except Exception as e:
            result = {"error": type(e).__name__,
                      "exc_type": getattr(e, "exc_type", None),
                      "value": getattr(e, "value", str(e))}
        print("elapsed=%.3f" % (time.monotonic() - started), file=sys.stderr, flush=True)
        print(json.dumps(result), flush=True)
    else:
        client.cast(ctxt, "process_message", message=message)
    transport.cleanup()


if __name__ == "__main__":
    main()
