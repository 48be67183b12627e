"""A small Streamlit websocket client: what a hostile visitor (or a browser) sends, without a browser.

It speaks the protocol Streamlit's own frontend speaks on ``/_stcore/stream``: protobuf ``BackMsg``
frames up (``rerun_script`` with a query string, a page and widget states; ``clear_cache``), protobuf
``ForwardMsg`` frames down (the page's elements as deltas, then ``script_finished``). Any header can be
set on the handshake (the authenticating proxy's e-mail header, a foreign ``Host``), so a test can play a
signed-in viewer, an analyst, a stranger or a signed-out visitor.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from google.protobuf.message import Message
from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ClientState_pb2 import ClientState
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
from streamlit.proto.WidgetStates_pb2 import WidgetState, WidgetStates
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

# A run that ends early for a rerun (``st.rerun``) is followed by another: only these end what a visitor sees.
FINISHED = {ForwardMsg.FINISHED_SUCCESSFULLY, ForwardMsg.FINISHED_WITH_COMPILE_ERROR}


def strings(message: Message) -> Iterator[str]:
    """Every string (and UTF-8 bytes) field of a protobuf message, recursively: all the text a page carries."""
    for descriptor, value in message.ListFields():
        if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
            values = [item for pair in value.items() for item in pair]
        elif isinstance(value, (str, bytes, Message)):
            values = [value]
        else:
            try:
                values = list(value)  # a repeated field
            except TypeError:
                values = [value]  # a number or a bool
        for item in values:
            if isinstance(item, Message):
                yield from strings(item)
            elif isinstance(item, str):
                yield item
            elif isinstance(item, bytes):
                yield item.decode("utf-8", errors="replace")


@dataclass
class Page:
    """What one script run drew: its elements by delta path (later deltas replace earlier ones)."""

    elements: dict[tuple[int, ...], Message] = field(default_factory=dict)
    messages: list[ForwardMsg] = field(default_factory=list)
    finished: int | None = None  # ForwardMsg.ScriptFinishedStatus, None while running

    def of(self, kind: str) -> list[Message]:
        """The elements of one kind (``markdown``, ``alert``, ``button``, ``code``, ``progress`` …)."""
        return [getattr(e, kind) for e in self.elements.values() if e.WhichOneof("type") == kind]

    @property
    def texts(self) -> list[str]:
        """Every string the server sent in this run for the page: its elements (text, widget labels, options,
        values, help, chart and table data) and the URL it put in the address bar. Not ``new_session``, which
        carries Streamlit's own settings (and the app script's path) to every client alike."""
        return [
            text
            for message in self.messages
            if message.WhichOneof("type") not in ("new_session", None)
            for text in strings(message)
        ]

    @property
    def alerts(self) -> list[str]:
        return [alert.body for alert in self.of("alert")]

    @property
    def markdown(self) -> list[str]:
        return [m.body for m in self.of("markdown")]

    def widget_id(self, key: str) -> str | None:
        """The server's id of the widget with the user key ``key`` (it ends with ``-key``), if drawn."""
        for element in self.elements.values():
            inner = getattr(element, element.WhichOneof("type") or "", None)
            identity = getattr(inner, "id", "")
            if isinstance(identity, str) and identity.endswith(f"-{key}"):
                return identity
        return None

    @property
    def exceptions(self) -> list[str]:
        return [f"{e.type}: {e.message}" for e in self.of("exception")]


class Refused(Exception):
    """The server closed the websocket instead of running the app."""


class Session:
    """One browser tab's websocket session: ``run`` a page with a query string, press widgets, clear caches."""

    def __init__(
        self,
        base: str,
        headers: Mapping[str, str] | None = None,
        host: str | None = None,
        timeout: float = 300.0,
    ) -> None:
        parts = urlsplit(base)
        assert parts.hostname is not None and parts.port is not None
        self.timeout = timeout
        self.widgets: dict[str, WidgetState] = {}
        sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
        # A foreign Host header is the URL's host: connect to the real address, name another in the handshake.
        uri = f"ws://{host or parts.netloc}/_stcore/stream"
        self._stack = contextlib.ExitStack()
        try:
            self.connection: ClientConnection = self._stack.enter_context(
                connect(
                    uri,
                    sock=sock,
                    subprotocols=["streamlit"],  # type: ignore[list-item]
                    additional_headers=dict(headers or {}),
                    max_size=None,
                    open_timeout=30,
                )
            )
        except InvalidStatus as refusal:
            sock.close()
            raise Refused(f"the server refused the websocket: HTTP {refusal.response.status_code}") from None

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def send(self, message: BackMsg) -> None:
        self.connection.send(message.SerializeToString())

    def clear_cache(self) -> None:
        """What Streamlit's "Clear cache" menu item sends (any client may send it)."""
        self.send(BackMsg(clear_cache=True))

    def run(
        self,
        page: str = "",
        query: str = "",
        triggers: tuple[str, ...] = (),
        values: Mapping[str, WidgetState] | None = None,
    ) -> Page:
        """Rerun the script for ``page`` (its url path) with ``query``; ``triggers``: button ids pressed in this
        run (as the frontend sends a click), ``values``: widget states to set. Returns the page it drew."""
        states = WidgetStates()
        self.widgets.update(values or {})
        for identity, state in self.widgets.items():
            copy = states.widgets.add()
            copy.CopyFrom(state)
            copy.id = identity
        for identity in triggers:
            states.widgets.add(id=identity, trigger_value=True)
        self.send(BackMsg(rerun_script=ClientState(query_string=query, page_name=page, widget_states=states)))
        return self.receive()

    def receive(self) -> Page:
        """Read until the script run ends; raises ``Refused`` when the server closes the connection."""
        page = Page()
        deadline = time.monotonic() + self.timeout
        while page.finished is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"the script did not finish within {self.timeout:.0f} s")
            try:
                data = self.connection.recv(timeout=remaining)
            except ConnectionClosed as closed:
                raise Refused(f"the server closed the websocket ({closed.rcvd})") from None
            except TimeoutError:
                continue
            message = ForwardMsg()
            message.ParseFromString(data if isinstance(data, bytes) else data.encode())
            page.messages.append(message)
            kind = message.WhichOneof("type")
            if kind == "new_session":
                page.elements.clear()
            elif kind == "delta" and message.delta.WhichOneof("type") == "new_element":
                page.elements[tuple(message.metadata.delta_path)] = message.delta.new_element
            elif kind == "script_finished" and message.script_finished in FINISHED:
                page.finished = message.script_finished
        return page
