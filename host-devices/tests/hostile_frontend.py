#!/usr/bin/env python3
"""A vhost-user frontend no driver would be, written from the vhost-user specification alone
(Python's standard library, no code shared with the backends).

    hostile_frontend.py DEVICE SOCKET PID [--console-file PATH]

DEVICE is blk, net (the backend runs --loopback) or console (its first port is file:PATH).
Each attack runs on a connection of its own: protocol garbage first, then a correct setup
followed by hostile rings. After every attack the backend process PID must be alive, answer
GET_FEATURES on a new connection, and keep its resident memory within 64 MiB of where it
started. blk also gets in-flight areas that lie (sizes, counts, descriptors) and regions
whose contents make no sense, including one that claims every head is in flight. At the end
a well-behaved session moves real data and checks it: blk writes a
pattern and reads it back, net sends a frame through the loopback and receives it, console
writes bytes that must appear in the port's file. Exits 0 when all of that holds; otherwise
prints what failed and exits 1."""

import array
import mmap
import os
import socket
import struct
import sys
import time

# Frontend requests (vhost-user specification).
GET_FEATURES, SET_FEATURES, SET_OWNER, RESET_OWNER, SET_MEM_TABLE = 1, 2, 3, 4, 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL = 12, 13
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
GET_CONFIG, ADD_MEM_REG = 24, 37
GET_INFLIGHT_FD, SET_INFLIGHT_FD = 31, 32
VERSION, NEED_REPLY = 0x1, 0x8
# Feature bits.
VERSION_1, PROTOCOL_FEATURES = 1 << 32, 1 << 30
F_REPLY_ACK, F_MQ, F_CONFIG, F_MEM_SLOTS = 1 << 3, 1 << 0, 1 << 9, 1 << 15
MRG_RXBUF, EVENT_IDX = 1 << 15, 1 << 29
# Descriptor flags.
NEXT, WRITE, INDIRECT = 1, 2, 4

MEM = 1 << 20            # guest memory
USER = 0x7F00_0000_0000  # where the frontend says it is mapped
QSIZE = 64
DATA = 0x80000           # buffers
RSS_SLACK_KIB = 64 * 1024
TIMEOUT = 5.0


class Failure(Exception):
    pass


def ring_base(q):
    return 0x10000 * (q + 1)


class Frontend:
    """One connection, with its own shared guest memory."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        deadline = time.time() + TIMEOUT
        while True:
            try:
                self.sock.connect(path)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.05)
        self.memfd = os.memfd_create("guest", 0)
        os.ftruncate(self.memfd, MEM)
        self.mem = mmap.mmap(self.memfd, MEM)
        self.kicks, self.calls, self.avail = {}, {}, {}

    def close(self):
        self.sock.close()
        self.mem.close()
        os.close(self.memfd)
        for fd in list(self.kicks.values()) + list(self.calls.values()):
            os.close(fd)

    def send(self, request, payload=b"", fds=(), flags=VERSION, size=None):
        size = len(payload) if size is None else size
        message = struct.pack("<III", request, flags, size) + payload
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([message], ancillary)

    def recv_exact(self, n):
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise Failure("the backend closed the connection")
            out += chunk
        return out

    def reply(self):
        request, flags, size = struct.unpack("<III", self.recv_exact(12))
        if size > 4096:
            raise Failure(f"reply of {size} bytes")
        return request, self.recv_exact(size)

    def get_u64(self, request):
        self.send(request)
        _, body = self.reply()
        return struct.unpack("<Q", body[:8])[0]

    # The well-behaved handshake.
    def setup(self, queues, features_wanted):
        self.send(SET_OWNER)
        offered = self.get_u64(GET_FEATURES)
        self.send(SET_FEATURES, struct.pack("<Q", offered & (features_wanted | VERSION_1 | PROTOCOL_FEATURES)))
        protocol = self.get_u64(GET_PROTOCOL_FEATURES)
        self.send(SET_PROTOCOL_FEATURES, struct.pack("<Q", protocol & (F_MQ | F_CONFIG | F_MEM_SLOTS)))
        self.send(SET_MEM_TABLE, memory_table([(0, MEM, USER, 0)]), [self.memfd])
        for q in range(queues):
            self.setup_queue(q)
        self.get_u64(GET_FEATURES)  # a barrier: every message before it was handled

    def setup_queue(self, q, desc=None, avail=None, used=None):
        base = ring_base(q)
        desc = USER + base if desc is None else desc
        avail = USER + base + 0x1000 if avail is None else avail
        used = USER + base + 0x2000 if used is None else used
        self.send(SET_VRING_NUM, struct.pack("<II", q, QSIZE))
        self.send(SET_VRING_ADDR, struct.pack("<IIQQQQ", q, 0, desc, used, avail, 0))
        self.send(SET_VRING_BASE, struct.pack("<II", q, 0))
        self.calls[q] = os.eventfd(0, os.EFD_NONBLOCK)
        self.send(SET_VRING_CALL, struct.pack("<Q", q), [self.calls[q]])
        self.kicks[q] = os.eventfd(0)
        self.send(SET_VRING_KICK, struct.pack("<Q", q), [self.kicks[q]])
        self.send(SET_VRING_ENABLE, struct.pack("<II", q, 1))
        self.avail[q] = 0

    # Rings.
    def put_desc(self, table, index, addr, length, flags, nxt):
        struct.pack_into("<QIHH", self.mem, table + 16 * index, addr, length, flags, nxt)

    def offer(self, q, head, kick=True):
        base = ring_base(q) + 0x1000
        struct.pack_into("<H", self.mem, base + 4 + 2 * (self.avail[q] % QSIZE), head)
        self.avail[q] = (self.avail[q] + 1) & 0xFFFF
        struct.pack_into("<H", self.mem, base + 2, self.avail[q])
        if kick:
            self.kick(q)

    def kick(self, q):
        os.eventfd_write(self.kicks[q], 1)

    def used_idx(self, q):
        return struct.unpack_from("<H", self.mem, ring_base(q) + 0x2000 + 2)[0]

    def used_elem(self, q, i):
        return struct.unpack_from("<II", self.mem, ring_base(q) + 0x2000 + 4 + 8 * (i % QSIZE))

    def wait_used(self, q, count, what):
        deadline = time.time() + TIMEOUT
        while self.used_idx(q) < count:
            if time.time() > deadline:
                raise Failure(f"{what}: queue {q} used index {self.used_idx(q)}, expected {count}")
            time.sleep(0.002)


def memory_table(regions, count=None):
    count = len(regions) if count is None else count
    out = struct.pack("<II", count, 0)
    for guest, size, user, offset in regions:
        out += struct.pack("<QQQQ", guest, size, user, offset)
    return out


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise Failure(f"process {pid} has no VmRSS: it has exited")


# Protocol garbage: each takes a fresh connection.
def garbage_attacks(queues):
    big = 0x1000_0000

    def short_frame(f):
        f.sock.sendall(struct.pack("<III", GET_FEATURES, VERSION, 64) + b"\x00" * 10)

    def huge_size(f):
        f.sock.sendall(struct.pack("<III", SET_FEATURES, VERSION, big) + b"\x00" * 64)

    def wrong_payload_sizes(f):
        f.send(SET_FEATURES, b"\x01\x02\x03")
        f.send(SET_VRING_NUM, b"\x00" * 3)
        f.send(SET_VRING_ADDR, b"\x00" * 12)
        f.send(SET_MEM_TABLE, b"\x01\x00", [f.memfd])

    def missing_and_extra_fds(f):
        f.send(SET_OWNER)
        f.send(SET_MEM_TABLE, memory_table([(0, MEM, USER, 0)]))
        fds = [os.eventfd(0) for _ in range(6)]
        f.send(GET_FEATURES, b"", fds)
        f.send(SET_VRING_KICK, struct.pack("<Q", 0))
        f.send(SET_VRING_CALL, struct.pack("<Q", 0), fds[:3])
        for fd in fds:
            os.close(fd)

    def unknown_requests(f):
        for request in (0, 999, 0xFFFF_FFFF, 60, 41):
            f.send(request, b"\x00" * 8, flags=VERSION | NEED_REPLY)

    def out_of_order(f):
        f.send(SET_VRING_ADDR, struct.pack("<IIQQQQ", 0, 0, USER, USER + 0x2000, USER + 0x1000, 0))
        f.send(SET_VRING_ENABLE, struct.pack("<II", 0, 1))
        f.kicks[0] = os.eventfd(0)
        f.send(SET_VRING_KICK, struct.pack("<Q", 0), [f.kicks[0]])
        f.kick(0)
        f.send(SET_PROTOCOL_FEATURES, struct.pack("<Q", 0xFFFF_FFFF_FFFF_FFFF))
        f.send(SET_FEATURES, struct.pack("<Q", 0xFFFF_FFFF_FFFF_FFFF))
        f.send(SET_OWNER)
        f.send(SET_OWNER)
        f.send(RESET_OWNER)

    def vring_indexes_out_of_range(f):
        f.send(SET_OWNER)
        for index in (queues, 1000, 0xFFFF, 0xFFFF_FFFF):
            f.send(SET_VRING_NUM, struct.pack("<II", index, 16))
            f.send(SET_VRING_BASE, struct.pack("<II", index, 0))
            f.send(SET_VRING_ENABLE, struct.pack("<II", index, 1))
            f.send(GET_VRING_BASE, struct.pack("<II", index, 0))
            f.send(SET_VRING_KICK, struct.pack("<Q", index & 0xFF))
        f.send(SET_VRING_NUM, struct.pack("<II", 0, 0))
        f.send(SET_VRING_NUM, struct.pack("<II", 0, 3))
        f.send(SET_VRING_NUM, struct.pack("<II", 0, 65535))

    def huge_region_count(f):
        f.send(SET_OWNER)
        f.send(SET_MEM_TABLE, memory_table([(0, MEM, USER, 0)], count=0xFFFF), [f.memfd])
        f.send(SET_MEM_TABLE, memory_table([(0, MEM, USER, 0)], count=0xFFFF_FFFF), [f.memfd])
        f.send(ADD_MEM_REG, struct.pack("<Q", 0) + struct.pack("<QQQQ", 0, 1 << 62, USER, 0), [f.memfd])

    def overlapping_regions(f):
        f.send(SET_OWNER)
        regions = [(0, MEM, USER, 0), (0x8000, MEM, USER + 0x8000, 0), (1 << 63, 1 << 63, 1 << 63, 0)]
        f.send(SET_MEM_TABLE, memory_table(regions), [f.memfd] * 3)
        f.send(SET_MEM_TABLE, memory_table([(0, MEM * 64, USER, 0)]), [f.memfd])
        f.send(SET_MEM_TABLE, memory_table([(0, MEM, USER, MEM)]), [f.memfd])

    def rings_outside_memory(f):
        f.setup(0, 0)
        f.setup_queue(0, desc=USER + MEM * 4, avail=0xFFFF_FFFF_FFFF_F000, used=USER - 0x1000)
        f.kick(0)
        f.get_u64(GET_FEATURES)

    return [short_frame, huge_size, wrong_payload_sizes, missing_and_extra_fds, unknown_requests, out_of_order,
            vring_indexes_out_of_range, huge_region_count, overlapping_regions, rings_outside_memory]


# Hostile rings, each after a correct setup, on queue `q` (blk 0, net and console transmit 1).
def ring_attacks(q):
    table = ring_base(q)

    def descriptor_loop(f):
        f.put_desc(table, 0, DATA, 16, NEXT, 1)
        f.put_desc(table, 1, DATA + 0x100, 16, NEXT, 0)
        f.offer(q, 0)

    def chain_longer_than_ring(f):
        for i in range(QSIZE):
            f.put_desc(table, i, DATA + 0x100 * i, 64, NEXT, (i + 1) % QSIZE)
        f.offer(q, 0)

    def indirect_bad_length(f):
        f.put_desc(table, 0, DATA, 17, INDIRECT, 0)
        f.put_desc(table, 1, DATA, 0, INDIRECT, 0)
        f.put_desc(table, 2, DATA, 0xFFFF_FFF0, INDIRECT, 0)
        for head in (0, 1, 2):
            f.offer(q, head)

    def indirect_nested(f):
        inner = DATA + 0x1000
        struct.pack_into("<QIHH", f.mem, DATA, inner, 32, INDIRECT, 0)
        struct.pack_into("<QIHH", f.mem, inner, DATA, 16, INDIRECT | NEXT, 1)
        struct.pack_into("<QIHH", f.mem, inner + 16, DATA, 16, INDIRECT, 0)
        f.put_desc(table, 0, DATA, 16, INDIRECT, 0)
        f.offer(q, 0)

    def indirect_loop(f):
        for i in range(8):
            struct.pack_into("<QIHH", f.mem, DATA + 16 * i, DATA + 0x2000, 64, NEXT, (i + 1) % 8)
        f.put_desc(table, 0, DATA, 128, INDIRECT, 0)
        f.offer(q, 0)

    def addresses_outside_or_wrapping(f):
        f.put_desc(table, 0, 0xFFFF_FFFF_FFFF_FFF0, 0x100, NEXT, 1)
        f.put_desc(table, 1, MEM * 8, 0x1000, WRITE, 0)
        f.put_desc(table, 2, MEM - 8, 0x1000, 0, 0)
        f.put_desc(table, 3, 0, 0xFFFF_FFFF, 0, 0)
        for head in (0, 2, 3):
            f.offer(q, head)

    def avail_index_past_ring(f):
        struct.pack_into("<H", f.mem, ring_base(q) + 0x1000 + 2, 40000)
        f.kick(q)
        f.kick(q)

    def heads_out_of_range(f):
        for head in (QSIZE, 5000, 0xFFFF):
            f.offer(q, head)

    def aliasing_chain(f):
        # Every descriptor points at the same 1 MiB: far more than a chain may hold.
        for i in range(16):
            f.put_desc(table, i, 0, MEM, NEXT if i < 15 else 0, i + 1)
        f.offer(q, 0)

    return [descriptor_loop, chain_longer_than_ring, indirect_bad_length, indirect_nested, indirect_loop,
            addresses_outside_or_wrapping, avail_index_past_ring, heads_out_of_range, aliasing_chain]


# In-flight tracking (blk): areas that lie, regions whose contents make no sense.
def inflight_message(size, offset, queues, queue_size):
    return struct.pack("<QQHHI", size, offset, queues, queue_size, 0)


def region_size(queue_size):
    return (16 + 16 * queue_size + 63) // 64 * 64


def inflight_attacks():
    def absurd_area_requests(f):
        f.send(SET_OWNER)
        for queues, queue_size in ((0, 128), (0xFFFF, 128), (1, 0), (1, 100), (64, 0x8000), (1, 0xFFFF)):
            f.send(GET_INFLIGHT_FD, inflight_message(0, 0, queues, queue_size))
            f.sock.recvmsg(12 + 24, socket.CMSG_SPACE(4 * 4))  # a reply, with an area or without
        f.send(GET_INFLIGHT_FD, b"\x01")

    def areas_that_lie(f):
        f.setup(1, 0)
        small = os.memfd_create("small", 0)
        os.ftruncate(small, 64)
        claims = [(1 << 30, 0, 1, QSIZE), (region_size(QSIZE), 1 << 63, 1, QSIZE), (64, 0, 1, QSIZE),
                  (1 << 62, 0xFFFF_FFFF_FFFF_FF00, 0xFFFF, 0x8000)]
        for claim in claims:
            f.send(SET_INFLIGHT_FD, inflight_message(*claim), [small], flags=VERSION | NEED_REPLY)
        f.send(SET_INFLIGHT_FD, inflight_message(region_size(QSIZE), 0, 1, QSIZE))
        f.send(SET_INFLIGHT_FD, b"\x00" * 4, [small, small])
        os.close(small)
        f.get_u64(GET_FEATURES)

    def region_with(fill):
        def attack(f):
            area = os.memfd_create("area", 0)
            os.ftruncate(area, region_size(QSIZE))
            fill(area)
            f.send(SET_INFLIGHT_FD, inflight_message(region_size(QSIZE), 0, 1, QSIZE), [area])
            os.close(area)
            f.setup(1, 0)  # the ring starts: its first pass examines the region
            time.sleep(0.05)
        return attack

    def garbage(area):
        os.pwrite(area, b"\xff" * region_size(QSIZE), 0)

    def every_head_in_flight(area):
        # A believable header (version 1, desc_num, used_idx 0) and every head in flight: the
        # ring's zeroed descriptors are resubmitted, refused one by one, and the ring, whose
        # avail index never moved, is then broken.
        os.pwrite(area, struct.pack("<QHHHH", 0, 1, QSIZE, 0, 0), 0)
        for head in range(QSIZE):
            os.pwrite(area, struct.pack("<B5xHQ", 1, 0, head), 16 + 16 * head)

    def batch_list_loop(area):
        # The used index is ahead of the region's and the batch list points at itself.
        os.pwrite(area, struct.pack("<QHHHH", 0, 1, QSIZE, 5, 0xFFF0), 0)
        os.pwrite(area, struct.pack("<B5xHQ", 1, 5, 0), 16 + 16 * 5)

    attacks = [absurd_area_requests, areas_that_lie]
    for name, fill in (("garbage_region", garbage), ("every_head_in_flight", every_head_in_flight),
                       ("batch_list_loop", batch_list_loop)):
        attack = region_with(fill)
        attack.__name__ = name
        attacks.append(attack)
    return attacks


def check_backend(path, pid, baseline, what):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise Failure(f"after {what}: the backend (pid {pid}) is gone")
    f = Frontend(path)
    try:
        f.get_u64(GET_FEATURES)
    except (OSError, Failure) as e:
        raise Failure(f"after {what}: the backend does not answer GET_FEATURES: {e}")
    finally:
        f.close()
    rss = rss_kib(pid)
    if rss > baseline + RSS_SLACK_KIB:
        raise Failure(f"after {what}: resident memory {rss} KiB, started at {baseline} KiB")
    return rss


def run_attack(path, attack, prepare=None):
    f = Frontend(path)
    try:
        if prepare:
            prepare(f)
        attack(f)
        time.sleep(0.05)  # let the backend's workers see the kicks
    except (OSError, Failure):
        pass  # the backend may refuse or close: what counts is how it is afterwards
    finally:
        f.close()


# Well-behaved sessions that move data and check it.
def blk_session(path):
    f = Frontend(path)
    try:
        f.setup(1, 0)
        table, pattern = ring_base(0), bytes((i * 7 + 3) & 0xFF for i in range(4096))
        struct.pack_into("<IIQ", f.mem, DATA, 1, 0, 8)  # OUT, sector 8
        f.mem[DATA + 0x1000:DATA + 0x2000] = pattern
        f.put_desc(table, 0, DATA, 16, NEXT, 1)
        f.put_desc(table, 1, DATA + 0x1000, 4096, NEXT, 2)
        f.put_desc(table, 2, DATA + 0x3000, 1, WRITE, 0)
        f.mem[DATA + 0x3000] = 0xFF
        f.offer(0, 0)
        f.wait_used(0, 1, "a write")
        if f.mem[DATA + 0x3000] != 0:
            raise Failure(f"the write's status is {f.mem[DATA + 0x3000]}")
        struct.pack_into("<IIQ", f.mem, DATA + 0x100, 0, 0, 8)  # IN, sector 8
        f.put_desc(table, 3, DATA + 0x100, 16, NEXT, 4)
        f.put_desc(table, 4, DATA + 0x4000, 4096, WRITE | NEXT, 5)
        f.put_desc(table, 5, DATA + 0x3001, 1, WRITE, 0)
        f.offer(0, 3)
        f.wait_used(0, 2, "a read")
        if f.mem[DATA + 0x3001] != 0 or f.mem[DATA + 0x4000:DATA + 0x5000] != pattern:
            raise Failure("the data read back differs from what was written")
    finally:
        f.close()


def net_session(path):
    f = Frontend(path)
    try:
        f.setup(2, 0)
        rx, tx = ring_base(0), ring_base(1)
        f.put_desc(rx, 0, DATA + 0x8000, 2048, WRITE, 0)
        f.offer(0, 0)
        frame = bytes([2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00]) + bytes(range(46))
        f.mem[DATA:DATA + 12 + len(frame)] = bytes(12) + frame
        f.put_desc(tx, 0, DATA, 12 + len(frame), 0, 0)
        f.offer(1, 0)
        f.wait_used(1, 1, "a transmitted frame")
        f.wait_used(0, 1, "the looped-back frame")
        _, length = f.used_elem(0, 0)
        got = bytes(f.mem[DATA + 0x8000 + 12:DATA + 0x8000 + length])
        if got != frame:
            raise Failure(f"the frame came back as {got.hex()}")
    finally:
        f.close()


def console_session(path, port_file):
    f = Frontend(path)
    try:
        f.setup(2, 0)
        message = b"pvkit console after the attacks\n"
        f.mem[DATA:DATA + len(message)] = message
        f.put_desc(ring_base(1), 0, DATA, len(message), 0, 0)
        f.offer(1, 0)
        f.wait_used(1, 1, "console output")
        deadline = time.time() + TIMEOUT
        while not open(port_file, "rb").read().endswith(message):
            if time.time() > deadline:
                raise Failure("the console output did not reach the port's file")
            time.sleep(0.01)
    finally:
        f.close()


def cpu_seconds(pid):
    """User and system time the process has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def net_receive_buffers_too_small(path, pid):
    """With MRG_RXBUF a frame may span buffers; here every buffer posted together is smaller
    than the looped-back frame. The backend must wait for more without spinning, and deliver
    the frame once a buffer that fits comes."""
    f = Frontend(path)
    try:
        f.setup(2, MRG_RXBUF | EVENT_IDX)
        rx, tx = ring_base(0), ring_base(1)
        for i in range(2):
            f.put_desc(rx, i, DATA + 0x8000 + 0x100 * i, 16, WRITE, 0)
            f.offer(0, i)
        frame = bytes([2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00]) + bytes(46)
        f.mem[DATA:DATA + 12 + len(frame)] = bytes(12) + frame
        f.put_desc(tx, 0, DATA, 12 + len(frame), 0, 0)
        f.offer(1, 0)
        f.wait_used(1, 1, "the transmitted frame")
        before = cpu_seconds(pid)
        time.sleep(1.0)
        spent = cpu_seconds(pid) - before
        if spent > 0.5:
            raise Failure(f"the backend used {spent:.2f} s of CPU in 1 s waiting for receive buffers: it spins")
        f.put_desc(rx, 2, DATA + 0xA000, 2048, WRITE, 0)
        f.offer(0, 2)
        f.wait_used(0, 1, "the waiting frame, once a buffer that fits came")
    finally:
        f.close()


def main():
    if len(sys.argv) < 4 or sys.argv[1] not in ("blk", "net", "console"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    device, path, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
    port_file = sys.argv[5] if len(sys.argv) > 5 and sys.argv[4] == "--console-file" else None
    queues, attack_queue = {"blk": (1, 0), "net": (2, 1), "console": (2, 1)}[device]
    baseline = rss_kib(pid)
    peak = baseline
    try:
        for attack in garbage_attacks(queues):
            run_attack(path, attack)
            peak = max(peak, check_backend(path, pid, baseline, attack.__name__))
        for attack in ring_attacks(attack_queue):
            run_attack(path, attack, prepare=lambda f: f.setup(queues, 0))
            peak = max(peak, check_backend(path, pid, baseline, attack.__name__))
        if device == "blk":
            for attack in inflight_attacks():
                run_attack(path, attack)
                peak = max(peak, check_backend(path, pid, baseline, attack.__name__))
            blk_session(path)
        elif device == "net":
            net_receive_buffers_too_small(path, pid)
            peak = max(peak, check_backend(path, pid, baseline, "net_receive_buffers_too_small"))
            net_session(path)
        else:
            console_session(path, port_file)
    except Failure as e:
        print(f"hostile_frontend {device}: {e}", file=sys.stderr)
        return 1
    attacks = len(garbage_attacks(queues)) + len(ring_attacks(attack_queue)) + (device == "net")
    attacks += len(inflight_attacks()) if device == "blk" else 0
    print(f"hostile_frontend {device}: {attacks} attacks survived; resident memory {baseline} -> peak {peak} KiB; "
          f"data checked after them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
