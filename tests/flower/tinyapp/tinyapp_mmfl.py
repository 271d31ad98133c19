"""numpy-only ServerApp/ClientApp with mmfl's run-config and node-config keys.

The ServerApp waits for ``nodes`` SuperNodes, then runs ``rounds`` (from the mmfl config file)
rounds of one ``query`` message per node, and writes ``rounds.csv``, ``metrics.csv`` and
``summary.json`` into ``out-dir`` like an mmfl run. A round records the client ids that replied.
"""

import json
import os
import time
import tomllib

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    out = str(rc["out-dir"])
    with open(str(rc["config-file"]), "rb") as f:
        cfg = tomllib.load(f)
    os.makedirs(out, exist_ok=True)
    deadline = time.monotonic() + float(rc["node-wait"])
    while len(list(grid.get_node_ids())) < int(rc["nodes"]):
        if time.monotonic() > deadline:
            raise RuntimeError("not enough SuperNodes")
        time.sleep(0.5)
    with open(os.path.join(out, "rounds.csv"), "w") as r, \
            open(os.path.join(out, "metrics.csv"), "w") as m:
        r.write("round,slots,missing,clients\n")
        m.write("round,task,accuracy,loss\n")
        for t in range(int(cfg["rounds"])):
            ids = list(grid.get_node_ids())
            msgs = [Message(RecordDict({"arrays": ArrayRecord([np.full(3, t, np.float32)]),
                                        "config": ConfigRecord({"round": t})}),
                            dst_node_id=n, message_type="query", group_id=str(t)) for n in ids]
            replies = list(grid.send_and_receive(msgs, timeout=float(rc["round-timeout"])))
            ok = [x for x in replies if not x.has_error()]
            got = sorted(int(x.content["metrics"]["client-id"]) for x in ok)
            r.write(f"{t + 1},{len(msgs)},{len(msgs) - len(ok)},{' '.join(map(str, got))}\n")
            m.write(f"{t + 1},tiny,{len(ok) / max(len(msgs), 1)},0.0\n")
            r.flush()
            m.flush()
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"mean_accuracy": 1.0, "min_accuracy": 1.0, "status": "completed",
                   "tasks": {"tiny": {"accuracy": 1.0, "loss": 0.0}}}, f)


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    cid = int(context.node_config["client-id"])
    data = np.load(str(context.node_config["data-file"]))
    x = msg.content["arrays"].to_numpy_ndarrays()[0]
    return Message(RecordDict({"arrays": ArrayRecord([x + data.sum()]),
                               "metrics": MetricRecord({"client-id": cid})}), reply_to=msg)
