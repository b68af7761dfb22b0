"""Queue many referrals quickly through the Python API (one process, no delivery).

    python tests/_enqueue.py DATA TO COUNT [BIGFILE]

Prints one record ID per line. Used by the sync and fault tests.
"""

import asyncio
import os
import sys

from node import Node


async def main(data: str, to: str, count: int, big: str | None) -> None:
    async with Node.open(data, passphrase=os.environ["CABINET_PASSPHRASE"]) as node:
        letter = "Cher confrère,\n" + "x" * 5000
        for i in range(count):
            r = await node.send_referral(to=to, patient=f"Patient {i}", born="1970-01-01", subject=f"n{i}",
                                         letter=letter, deliver=False)
            print(r.record_id)
        if big:
            r = await node.send_referral(to=to, patient="Big Scan", subject="scan", letter="see attachment",
                                         attachments=[big], deliver=False)
            print(r.record_id)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None))
