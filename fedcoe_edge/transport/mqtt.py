"""MQTT v5 transport on paho-mqtt 2.x, shaped by what Mosquitto and paho actually do.

FedCoE (arXiv 2605.21264) devices and the coordinator exchange expert subsets over MQTT
(docs/design.md, section 8). This client follows the measured rules there:

* stable client id, ``clean_start=False`` with a session expiry, so QoS 1 messages wait
  for a device that drops off for a while;
* the will is set before connect; an optional birth message is published on every
  connect (presence: "online" on connect, last-will "offline");
* paho's own loop thread does the reconnects, forever, with a capped exponential delay
  and jitter (:class:`_BackoffClient`: a fleet that lost its broker does not come back in
  lock step), and every subscription is renewed in ``on_connect`` (a broker without
  persistence forgets them); with ``keep_trying`` (the daemons) a broker that is not
  reachable at start is retried the same way instead of being an error (docs/daemons.md,
  "Reconnects");
* MaximumPacketSize is read from CONNACK and oversize publishes are refused locally
  (an oversize QoS 1 publish makes paho reconnect and resend forever);
* paho callbacks never block: they enqueue onto a worker thread that runs handlers.
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fedcoe_edge.errors import ConfigError, WireError
from fedcoe_edge.transport.base import (
    MQTT_MAX_PACKET_SIZE,
    Dispatcher,
    Handler,
    Message,
    Transport,
    Will,
    check_filter,
    check_topic,
)

__all__ = ["MqttTransport", "TlsSettings"]

log = logging.getLogger("fedcoe_edge.transport.mqtt")


def jittered(delay: float, rng: random.Random | None = None) -> float:
    """A wait drawn from [delay/2, delay] ("equal jitter"): never under half the backoff
    step, so a broker coming back is not hammered, and spread, so devices that lost it
    together do not reconnect together."""
    return (rng or random).uniform(delay / 2, delay)


class _BackoffClient(mqtt.Client):
    """paho's client whose wait between connection attempts (paho doubles it from the
    minimum to the cap, and resets it on every CONNACK) is jittered and logged.

    Overrides paho 2.x's ``_reconnect_wait``, which its network loop calls before every
    retry, first connection included when started with ``loop_start``; the loop body is
    paho's own, so a ``disconnect()`` or ``loop_stop()`` still ends the wait within a second.
    """

    on_backoff: Callable[[float], None] | None = None

    def _reconnect_wait(self) -> None:
        with self._reconnect_delay_mutex:
            if self._reconnect_delay is None:
                self._reconnect_delay = self._reconnect_min_delay
            else:
                self._reconnect_delay = min(self._reconnect_delay * 2, self._reconnect_max_delay)
            step = float(self._reconnect_delay)
        wait = jittered(step)
        if self.on_backoff is not None:
            self.on_backoff(wait)
        until = time.monotonic() + wait
        done = (mqtt._ConnectionState.MQTT_CS_DISCONNECTING,
                mqtt._ConnectionState.MQTT_CS_DISCONNECTED)
        while self._state not in done and not self._thread_terminate:
            left = until - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, 1.0))


@dataclass(frozen=True)
class TlsSettings:
    """TLS for a production broker (see deploy/mosquitto/). Paths to PEM files."""

    ca_certs: str
    certfile: str | None = None
    keyfile: str | None = None


class MqttTransport(Transport):
    """One MQTT v5 session. Create, optionally subscribe, then :meth:`connect`."""

    def __init__(
        self,
        client_id: str,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: TlsSettings | None = None,
        will: Will | None = None,
        birth: Will | None = None,
        keepalive_s: int = 30,
        session_expiry_s: int = 3600,
        reconnect_min_s: int = 1,
        reconnect_max_s: int = 30,
        max_inflight: int = 20,
        keep_trying: bool = False,
    ) -> None:
        """``keep_trying``: a broker that does not answer :meth:`connect` in time is not an
        error; the connection is retried in the background, forever, until :meth:`close`
        (a broker that answers and refuses us is still a :class:`ConfigError`)."""
        if not client_id or len(client_id) > 128:
            raise ConfigError(
                f"mqtt transport: client id must be 1..128 characters, got {client_id!r}"
            )
        self.client_id = client_id
        self.host, self.port = host, port
        self.will, self.birth = will, birth
        self._keepalive = keepalive_s
        self._session_expiry = session_expiry_s
        self._dispatcher = Dispatcher(f"mqtt-{client_id}")
        self._sub_qos: dict[str, int] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._first_connack = threading.Event()
        self._connect_error: str | None = None
        self._max_packet = MQTT_MAX_PACKET_SIZE
        self._pending_subacks: dict[int, threading.Event] = {}
        self._early_subacks: set[int] = set()
        self._subs_ready = threading.Event()
        self._renewal_mid: int | None = None
        self._unacked: set[int] = set()  # QoS 1 mids without PUBACK yet
        self._ignore: set[int] = set()  # QoS 0 mids whose on_publish is still to come
        self._early: set[int] = set()  # acks that arrived before publish() recorded the mid
        self._acked_cv = threading.Condition()
        self._closed = False
        self.reconnects = 0
        self.keep_trying = keep_trying
        self._failed_tries = 0  # retries since the last CONNACK

        c = _BackoffClient(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        if username is not None:
            c.username_pw_set(username, password)
        if tls is not None:
            c.tls_set(
                ca_certs=tls.ca_certs,
                certfile=tls.certfile,
                keyfile=tls.keyfile,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        if will is not None:  # must precede connect
            c.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        c.reconnect_delay_set(min_delay=reconnect_min_s, max_delay=reconnect_max_s)
        c.max_inflight_messages_set(max_inflight)
        c.max_queued_messages_set(0)  # unbounded: flow control lives in the blob window
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_publish = self._on_publish
        c.on_connect_fail = self._on_connect_fail
        c.on_backoff = self._on_backoff
        self._client = c

    # --- Transport API ---

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def max_packet_size(self) -> int:
        return self._max_packet

    def connect(self, timeout: float = 10.0) -> None:
        """Start the network thread and wait for the first CONNACK.

        Later disconnects are repaired by paho in the background; this raises
        :class:`ConfigError` if the broker refuses us now, or, without ``keep_trying``, if
        it is unreachable. With ``keep_trying`` an unreachable broker is logged and left
        to the background retries: connection listeners hear of the session once it is up.
        """
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._session_expiry
        self._client.connect_async(
            self.host, self.port, keepalive=self._keepalive, clean_start=False, properties=props
        )
        self._client.loop_start()
        if not self._first_connack.wait(timeout):
            if self.keep_trying:
                log.warning("%s: no answer from broker %s:%d within %g s; still trying in the "
                            "background (backoff up to %d s)", self.client_id, self.host,
                            self.port, timeout, self._client._reconnect_max_delay)
                return
            self._shutdown()
            raise ConfigError(
                f"mqtt: no answer from broker {self.host}:{self.port} within {timeout:g} s "
                f"(client {self.client_id!r}); is it running?"
            )
        if self._connect_error is not None:
            self._shutdown()
            raise ConfigError(
                f"mqtt: broker {self.host}:{self.port} refused client {self.client_id!r}: "
                f"{self._connect_error}"
            )
        if not self._subs_ready.wait(timeout):  # handlers registered before connect are live
            log.warning("%s: subscriptions not acknowledged within %g s", self.client_id, timeout)

    def subscribe(
        self, topic_filter: str, handler: Handler, qos: int = 1, *, bulk: bool = False,
        timeout: float = 5.0,
    ) -> None:
        """Add a handler; when connected, waits (off the network thread) for the SUBACK so
        that messages published right after this call are not missed."""
        check_filter(topic_filter)
        self._dispatcher.add(topic_filter, handler, bulk=bulk)
        with self._lock:
            self._sub_qos[topic_filter] = qos
        if not self.connected:
            return  # on_connect subscribes to everything in _sub_qos
        ev = threading.Event()
        rc, mid = self._client.subscribe(topic_filter, qos=qos)  # never under our lock
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return  # disconnected meanwhile: on_connect will subscribe
        with self._lock:
            if mid in self._early_subacks:
                self._early_subacks.discard(mid)
                return
            self._pending_subacks[mid] = ev
        if not ev.wait(timeout):
            log.warning("%s: no SUBACK for %r within %g s", self.client_id, topic_filter, timeout)

    def unsubscribe(self, topic_filter: str) -> None:
        self._dispatcher.remove(topic_filter)
        with self._lock:
            self._sub_qos.pop(topic_filter, None)
        if self.connected:
            self._client.unsubscribe(topic_filter)

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        expiry_s: int | None = None,
    ) -> None:
        """Hand a message to paho. QoS 1 while disconnected is queued and sent after the
        reconnect; QoS 0 while disconnected is lost (heartbeats only)."""
        check_topic(topic)
        if qos not in (0, 1, 2):
            raise WireError(f"publish to {topic!r}: qos must be 0, 1 or 2, got {qos}")
        self.check_size(topic, len(payload), qos, expiry_s is not None)
        props = None
        if expiry_s is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = int(expiry_s)
        # paho calls on_publish while holding its own lock, so ours is never held across
        # client.publish(); an ack that beats the bookkeeping lands in _early.
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        ok = info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN)
        with self._acked_cv:
            if info.mid in self._early:
                self._early.discard(info.mid)
            elif ok and qos > 0:
                self._unacked.add(info.mid)
            elif info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._ignore.add(info.mid)  # QoS 0: on_publish fires once it is written
        if not ok:
            raise WireError(f"publish to {topic!r}: paho refused it ({mqtt.error_string(info.rc)})")

    def flush(self, timeout: float) -> bool:
        """Wait until the broker acknowledged every QoS 1 publish (not on the handler thread)."""
        with self._acked_cv:
            return self._acked_cv.wait_for(lambda: not self._unacked, timeout)

    @property
    def unacked(self) -> int:
        """QoS 1 publishes the broker has not acknowledged yet (outgoing backlog)."""
        with self._acked_cv:
            return len(self._unacked)

    def close(self) -> None:
        """Clean DISCONNECT (so no will), stop the network and worker threads."""
        if self._closed:
            return
        self._closed = True
        self._shutdown()
        self._dispatcher.stop()

    def add_connection_listener(self, fn: Callable[[bool], None]) -> None:
        """``fn(True)`` fires once the broker acknowledged the renewed subscriptions."""
        self._dispatcher.add_listener(fn)

    def is_handler_thread(self) -> bool:
        return self._dispatcher.is_worker()

    def drop_connection(self) -> None:
        """Test hook: cut the socket without DISCONNECT, as a power loss would (the
        broker publishes the will); paho reconnects on its own."""
        sock = self._client.socket()
        if sock is not None:
            sock.close()

    # --- internals ---

    def _shutdown(self) -> None:
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
            self._connected.clear()

    # paho callbacks: run on paho's network thread, so they only record and enqueue.

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._connect_error = str(reason_code)
            log.warning("%s: broker refused connection: %s", self.client_id, reason_code)
            self._first_connack.set()
            return
        if self._first_connack.is_set():
            self.reconnects += 1
        self._failed_tries = 0
        mps = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
        self._max_packet = int(mps) if mps else MQTT_MAX_PACKET_SIZE
        with self._lock:
            subs = list(self._sub_qos.items())
        self._subs_ready.set()
        renewing = False
        if subs:  # a broker without persistence forgot them: renew every time
            rc, mid = client.subscribe([(f, q) for f, q in subs])
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                renewing = True
                self._subs_ready.clear()  # the SUBACK comes on this thread, after we return
                with self._lock:
                    self._pending_subacks[mid] = self._subs_ready
                    self._renewal_mid = mid
        if self.birth is not None:
            b = self.birth
            self.publish(b.topic, b.payload, qos=b.qos, retain=b.retain)
        self._connected.set()
        self._first_connack.set()
        log.info(
            "%s: connected to %s:%d (session present: %s, max packet %d)",
            self.client_id, self.host, self.port, flags.session_present, self._max_packet,
        )  # fmt: skip
        if not renewing:  # otherwise listeners hear of it once the SUBACK is in
            self._dispatcher.put_connection(True)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        """A TCP or TLS connect that failed (no broker there, a network down): retried."""
        log.debug("%s: connecting to %s:%d failed", self.client_id, self.host, self.port)

    def _on_backoff(self, wait_s: float) -> None:
        """Before each retry. Attempts 1, 2, 4, 8... since the last CONNACK are logged at
        INFO, the others at DEBUG: an operator sees the daemon is still trying, and a device
        waiting a day for its broker writes a few dozen lines, not thousands."""
        self._failed_tries += 1
        n = self._failed_tries
        level = logging.INFO if n & (n - 1) == 0 else logging.DEBUG
        log.log(level, "%s: broker %s:%d not reachable (attempt %d); next try in %.1f s",
                self.client_id, self.host, self.port, n, wait_s)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was:
            log.info("%s: disconnected (%s)", self.client_id, reason_code)
            self._dispatcher.put_connection(False)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._dispatcher.put(Message(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain)))

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        for rc in reason_codes:
            if rc.is_failure:
                log.warning("%s: subscription refused: %s", self.client_id, rc)
        with self._lock:
            ev = self._pending_subacks.pop(mid, None)
            if ev is None:
                self._early_subacks.add(mid)
            renewed = mid == self._renewal_mid
            if renewed:
                self._renewal_mid = None
        if ev is not None:
            ev.set()
        if renewed:
            self._dispatcher.put_connection(True)

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties,
    ) -> None:
        with self._acked_cv:
            if mid in self._unacked:
                self._unacked.discard(mid)
                self._acked_cv.notify_all()
            elif mid in self._ignore:
                self._ignore.discard(mid)
            else:
                self._early.add(mid)
