"""A customer-service assistant that acts: it looks orders up and refunds them, through tools.

Runs offline on the embedded default model (or --model PATH). The orders live in a small SQLite
table (in memory, or --db FILE); the assistant gets two Python functions as tools, and
`model.run` lets it call them, feeds it their results and returns the conversation:

    python examples/customer_service.py "Where is my order 1182?"
    python examples/customer_service.py "Order 1190 arrived broken, I want my money back."

Every call the model makes names one of the tools, with arguments valid for its schema (decoding
is constrained to them); a small model may still pick the wrong tool or order number.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
from typing import Literal

import dialogen

ORDERS = [  # (id, customer, item, status, total)
    (1182, "Ana", "espresso machine", "shipped", 249.0),
    (1187, "Ben", "running shoes", "processing", 89.5),
    (1190, "Chloé", "ceramic vase", "delivered", 42.0),
    (1201, "Dev", "desk lamp", "delivered", 35.0),
]
PERSONA = ("You are the support assistant of an online shop. Use the tools to look orders up and to refund them; "
           "never invent an order's status. Answer in one or two sentences.")


def open_db(path: str = ":memory:") -> sqlite3.Connection:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, customer TEXT, item TEXT, "
               "status TEXT, total REAL, refunded INTEGER DEFAULT 0)")
    db.executemany("INSERT OR IGNORE INTO orders (id, customer, item, status, total) VALUES (?, ?, ?, ?, ?)", ORDERS)
    db.commit()
    return db


def make_tools(db: sqlite3.Connection):
    """The two tools, bound to the database."""

    def lookup_order(order_id: int) -> dict:
        """Look up an order: its item, status, total and whether it was refunded.

        Args:
            order_id: The order's number, e.g. 1182.
        """
        row = db.execute("SELECT id, customer, item, status, total, refunded FROM orders WHERE id = ?",
                         (order_id,)).fetchone()
        if row is None:
            return {"error": f"no order {order_id}"}
        return dict(zip(("order_id", "customer", "item", "status", "total", "refunded"), row))

    def refund_order(order_id: int, reason: Literal["damaged", "late", "wrong_item", "other"]) -> dict:
        """Refund an order in full.

        Args:
            order_id: The order's number.
            reason: Why the customer wants the refund.
        """
        row = db.execute("SELECT total, refunded FROM orders WHERE id = ?", (order_id,)).fetchone()
        if row is None:
            return {"error": f"no order {order_id}"}
        if row[1]:
            return {"error": f"order {order_id} was already refunded"}
        db.execute("UPDATE orders SET refunded = 1, status = 'refunded' WHERE id = ?", (order_id,))
        db.commit()
        return {"order_id": order_id, "refunded": row[0], "reason": reason}

    return [lookup_order, refund_order]


def serve_customer(model, question: str, db: sqlite3.Connection, max_new_tokens: int = 60) -> list[dict]:
    """The conversation of one request: the assistant must consult a tool first, then answers."""
    messages = [{"role": "system", "content": PERSONA}, {"role": "user", "content": question}]
    return model.run(messages, tools=make_tools(db), max_steps=2, tool_choice="required", temperature=0,
                     max_new_tokens=max_new_tokens)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("questions", nargs="*", default=["Where is my order 1182?"])
    p.add_argument("--model", default=None, help="a model path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--db", default=":memory:", help="the orders database (default: in memory)")
    p.add_argument("--max-new-tokens", type=int, default=60)
    args = p.parse_args(argv)
    model, db = dialogen.load(args.model), open_db(args.db)
    for question in args.questions:
        for m in serve_customer(model, question, db, args.max_new_tokens)[1:]:
            if m.get("tool_calls"):
                for c in m["tool_calls"]:
                    print(f"[{m['role']} calls] {c['function']['name']}({c['function']['arguments']})")
            elif m["role"] == "tool":
                print(f"[{m['name']} returns] {m['content']}")
            else:
                print(f"[{m['role']}] {m['content']}")
        print()
    print("orders:", json.dumps(db.execute("SELECT id, status, refunded FROM orders").fetchall()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
