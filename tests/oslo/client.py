"""An application sending into a cell with a real oslo.messaging RPC client.

    client.py URL call|cast MESSAGE_TYPE CELLS_MESSAGE_JSON [TIMEOUT [CALL_MONITOR_TIMEOUT]] [OSLO ARGS]

Casts or calls `process_message(message=...)` on `cells.intercell.<type>`,
as nova-cells' rpc driver does, and for a call prints the result as JSON
(20 s timeout, no call monitoring unless given). A call that raises prints
`{"error": <class>, "exc_type": <remote class>, "value": <text>}` instead.
The call's duration goes to standard error as `elapsed=<seconds>`. OSLO ARGS
go to oslo.config, e.g. `--config-file deployment.conf` with an
`[oslo_messaging_rabbit]` section.
"""
import json
import sys
import time

from oslo_config import cfg
import oslo_messaging as messaging


def is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def main():
    url, mode, message_type, message = sys.argv[1:5]
    numbers = []
    rest = sys.argv[5:]
    while rest and len(numbers) < 2 and is_number(rest[0]):
        numbers.append(float(rest.pop(0)))
    timeout = numbers[0] if numbers else 20
    monitor = numbers[1] if len(numbers) > 1 else None
    messaging.set_transport_defaults("nova")
    conf = cfg.CONF
    conf(rest, project="cellhost-interop")
    transport = messaging.get_rpc_transport(conf, url=url)
    target = messaging.Target(topic="cells.intercell.%s" % message_type)
    client = messaging.get_rpc_client(transport, target)
    ctxt = json.loads(message)["ctxt"]
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
