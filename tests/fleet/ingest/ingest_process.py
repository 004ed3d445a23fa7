"""A fleet ingest in its own process (for the kill -9 test): prints its counters as JSON lines.

Usage: python ingest_process.py DATABASE_URL BROKER_PORT FLEET CLIENT_ID
"""

from __future__ import annotations

import json
import sys
import time

from fleet.db import Database
from fleet.ingest import Ingest, IngestSettings


def main() -> None:
    url, port, fleet, client_id = sys.argv[1:5]
    settings = IngestSettings(port=int(port), fleet=fleet, client_id=client_id, share_group="fleet")
    ingest = Ingest(Database(url), settings)
    ingest.start()
    while True:
        print(json.dumps({"connected": ingest.connected, **ingest.counters}), flush=True)
        time.sleep(0.05)


if __name__ == "__main__":
    main()
