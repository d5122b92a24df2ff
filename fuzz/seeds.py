#!/usr/bin/env python3
"""Writes the seed corpus (fuzz/corpus/<target>/seed-*): well-formed inputs in each target's
input format (see fuzz/src/lib.rs), the starting points the unit tests also use: block
requests of every type, transmit and receive chains, console data and control messages, a
virtio-mmio driver's initialisation, a vhost-user handshake."""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
RING = 16
NEXT, WRITE, INDIRECT = 1, 2, 4
ALL = 0xFFFF_FFFF_FFFF_FFFF


def desc(offset=0, length=0, flags=0, nxt=0):
    # Offsets are folded into the buffer area by the harness (top bits clear).
    return struct.pack("<QIHH", offset, length, flags, nxt)


def ring(chains, heads):
    """One queue: a count byte, 16 descriptors, then the heads made available."""
    table = b"".join(chains) + desc() * (RING - len(chains))
    return bytes([len(heads)]) + table + b"".join(struct.pack("<H", h) for h in heads)


def data(pieces, size=0x4000):
    out = bytearray(size)
    for offset, raw in pieces:
        out[offset:offset + len(raw)] = raw
    return bytes(out)


def blk_header(kind, sector=0):
    return struct.pack("<IIQ", kind, 0, sector)


def blk_seeds():
    chains = [
        desc(0x000, 16, NEXT, 1), desc(0x1000, 512, WRITE | NEXT, 2), desc(0x3000, 1, WRITE),  # read
        desc(0x100, 16, NEXT, 4), desc(0x1400, 1024, NEXT, 5), desc(0x3001, 1, WRITE),  # write
        desc(0x200, 16, NEXT, 7), desc(0x3002, 1, WRITE),  # flush
        desc(0x300, 16, NEXT, 9), desc(0x2000, 20, WRITE | NEXT, 10), desc(0x3003, 1, WRITE),  # get id
        desc(0x400, 32, NEXT, 12), desc(0x3004, 1, WRITE),  # discard (header + one segment)
        desc(0x500, 32, NEXT, 14), desc(0x3005, 1, WRITE),  # write zeroes
    ]
    pieces = [(0x000, blk_header(0, 3)), (0x100, blk_header(1, 8)), (0x200, blk_header(4)),
              (0x300, blk_header(8)), (0x400, blk_header(11) + struct.pack("<QII", 16, 8, 0)),
              (0x500, blk_header(13) + struct.pack("<QII", 32, 8, 1))]
    heads = [0, 3, 6, 8, 11, 13]
    yield "requests", bytes([0]) + struct.pack("<QQ", 0, ALL) + ring(chains, heads) + data(pieces)
    yield "file", bytes([2]) + struct.pack("<QQ", 0, ALL) + ring(chains, heads) + data(pieces)
    yield "failing", bytes([2 | 8]) + struct.pack("<QQ", 0x5555, ALL) + ring(chains, heads) + data(pieces)
    # One read through an indirect table at 0x800 (three entries).
    indirect = [desc(0x800, 48, INDIRECT)]
    # Entries of an indirect table are read as they are: absolute guest addresses.
    raw_table = b"".join(struct.pack("<QIHH", 0x10000 + o, l, f, n) for o, l, f, n in
                         [(0x000, 16, NEXT, 1), (0x1000, 4096, WRITE | NEXT, 2), (0x3000, 1, WRITE, 0)])
    pieces = [(0x000, blk_header(0)), (0x800, raw_table)]
    yield "indirect", bytes([0]) + struct.pack("<QQ", 0, ALL) + ring(indirect, [0]) + data(pieces)
    # Two queues, the second with its available index far past the ring.
    yield "broken", bytes([1]) + struct.pack("<QQ", 0, ALL) + ring(chains[:3], [0]) + bytes([0xFF]) + struct.pack("<H", 1000) + data([(0, blk_header(0))])


def frame(length=60):
    eth = bytes([2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00])
    return eth + bytes(length - len(eth))


def net_seeds():
    rx = ring([desc(0x2000 + 0x800 * i, 2048, WRITE) for i in range(4)], [0, 1, 2, 3])
    plain = struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 0)
    csum = struct.pack("<BBHHHHH", 1, 0, 0, 0, 14, 16, 0)
    gso = struct.pack("<BBHHHHH", 1, 1, 54, 1448, 34, 16, 0)
    tx = ring([desc(0x000, 12 + 60), desc(0x100, 12, NEXT, 2), desc(0x200, 60), desc(0x300, 12 + 1514)], [0, 1, 3])
    pieces = [(0x000, plain + frame()), (0x100, csum), (0x200, frame()), (0x300, gso + frame(1514))]
    for name, mode in [("loopback", 0), ("sink", 2), ("event-idx", 4)]:
        yield name, bytes([mode]) + struct.pack("<Q", ALL) + rx + tx + data(pieces)
    merge = ring([desc(0x2000 + 0x40 * i, 0x40, WRITE) for i in range(8)], list(range(8)))
    yield "mergeable-small", bytes([0]) + struct.pack("<Q", ALL) + merge + tx + data(pieces)


def control(port, event, value):
    return struct.pack("<IHH", port, event, value)


def console_seeds():
    rx = ring([desc(0x2000 + 0x100 * i, 0x100, WRITE) for i in range(4)], [0, 1, 2, 3])
    tx = ring([desc(0x000, 5), desc(0x010, 3, NEXT, 2), desc(0x020, 4)], [0, 1])
    messages = [control(0, 0, 1), control(0, 3, 1), control(1, 3, 1), control(1, 6, 1), control(0, 6, 1)]
    ctrl_tx = ring([desc(0x400 + 8 * i, 8) for i in range(len(messages))], list(range(len(messages))))
    ctrl_rx = ring([desc(0x3000 + 0x40 * i, 0x40, WRITE) for i in range(8)], list(range(8)))
    pieces = [(0x000, b"hello"), (0x010, b"abc"), (0x020, b"defg")] + \
             [(0x400 + 8 * i, m) for i, m in enumerate(messages)]
    yield "one-port", bytes([0]) + struct.pack("<Q", ALL) + rx + tx + data(pieces)
    yield "multiport", bytes([1]) + struct.pack("<Q", ALL) + rx + tx + ctrl_rx + ctrl_tx + rx + tx + data(pieces)


def mmio_seeds():
    def access(write, offset, value=0, width=4):
        op = (1 if write else 0) | ({1: 0, 2: 1, 4: 2, 8: 3}[width] << 1)
        return bytes([op]) + struct.pack("<HQ", offset, value)
    init = [access(True, 0x70, 0), access(True, 0x70, 1), access(True, 0x70, 3),
            access(False, 0x10), access(True, 0x14, 1), access(False, 0x10),
            access(True, 0x24, 1), access(True, 0x20, 1), access(True, 0x70, 11), access(False, 0x70)]
    for q, (desc_at, avail_at, used_at) in enumerate([(0x10000, 0x11000, 0x12000), (0x20000, 0x21000, 0x22000)]):
        init += [access(True, 0x30, q), access(False, 0x34), access(True, 0x38, 16),
                 access(True, 0x80, desc_at), access(True, 0x84, 0), access(True, 0x90, avail_at),
                 access(True, 0x94, 0), access(True, 0xA0, used_at), access(True, 0xA4, 0), access(True, 0x44, 1)]
    init += [access(True, 0x70, 15), access(False, 0x60), access(True, 0x64, 1), access(False, 0x100, width=1),
             access(False, 0xFC), access(True, 0x70, 0)]
    yield "init", struct.pack("<Q", 1 << 32 | 0x3000_0000) + b"".join(init)


def vhost(request, payload=b"", flags=1):
    return struct.pack("<III", request, flags, len(payload)) + payload


def chunk(raw, fd_plan=0):
    return struct.pack("<H", len(raw)) + bytes([fd_plan]) + raw


def relay_seeds():
    region = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, 0x100000, 0x7F0000000000, 0)
    handshake = [chunk(vhost(3)), chunk(vhost(1)), chunk(vhost(15)), chunk(vhost(16, struct.pack("<Q", 0x3F))),
                 chunk(vhost(18, struct.pack("<II", 0, 1), 9)), chunk(vhost(2, struct.pack("<Q", 1 << 30))),
                 chunk(vhost(5, region, 9), 1), chunk(vhost(5, region, 9), 1 | 0x80),
                 chunk(vhost(8, struct.pack("<QQ", 0, 256))), chunk(vhost(12, struct.pack("<Q", 0)), 1 | 4)]
    yield "handshake", b"".join(handshake)
    yield "split", b"".join(chunk(vhost(1)[i:i + 5]) for i in range(0, 12, 5))


def protocol_seeds():
    yield "blk-header", bytes([0]) + blk_header(1, 7)
    yield "net-header", bytes([3]) + struct.pack("<BBHHHHH", 1, 1, 54, 1448, 34, 16, 1) + frame()
    yield "console-control", bytes([7]) + control(1, 6, 1)
    yield "descriptor", bytes([9]) + struct.pack("<QIHH", 0x1000, 512, 3, 1)
    yield "used", bytes([10]) + struct.pack("<IIHH", 3, 512, 256, 0)
    yield "abi", bytes([11]) + b"pvkit.doorbells=0x6000 virtio_mmio.device=512@0xfeb00e00:12"


def backend_seeds():
    """A device (0 blk, 1 net, 2 console), the well-behaved handshake (op 0), a read or a
    frame laid out in guest memory (op 2: offset / 8, length, bytes), then kicks (op 3)."""
    features = struct.pack("<QQ", ALL, 0x3F)
    def write(offset, raw):
        return bytes([2]) + struct.pack("<HB", offset // 8, len(raw)) + raw
    read = (struct.pack("<QIHH", 0x8000, 16, NEXT, 1) + struct.pack("<QIHH", 0x9000, 512, WRITE | NEXT, 2)
            + struct.pack("<QIHH", 0xA000, 1, WRITE, 0))
    avail = struct.pack("<HHH", 0, 1, 0)
    blk = bytes([0, 0]) + features + write(0x1000, read) + write(0x1100, avail) + write(0x8000, blk_header(0)) + bytes([3, 0])
    yield "blk-read", blk
    frame_chain = struct.pack("<QIHH", 0x8000, 12 + 60, 0, 0)
    net = bytes([1, 0]) + features + write(0x2000, frame_chain) + write(0x2100, avail) + \
        write(0x8000, bytes(12) + frame()) + bytes([3, 1])
    yield "net-frame", net
    console = bytes([2, 0]) + features + write(0x2000, struct.pack("<QIHH", 0x8000, 5, 0, 0)) + \
        write(0x2100, avail) + write(0x8000, b"hello") + bytes([3, 1])
    yield "console-output", console


def inflight_seeds():
    """A region (version, desc_num, last batch head, used index, then a state per head), the
    ring's used index, then a queue and its data as the blk target takes them."""
    write = [desc(0x000, 16, NEXT, 1), desc(0x1000, 512, NEXT, 2), desc(0x3000, 1, WRITE),
             desc(0x100, 16, NEXT, 4), desc(0x1400, 512, NEXT, 5), desc(0x3001, 1, WRITE)]
    pieces = [(0x000, blk_header(1, 1)), (0x100, blk_header(1, 2))]
    region_size = (16 + 16 * RING + 63) // 64 * 64

    def region(used_idx, states, last_batch_head=0):
        raw = struct.pack("<QHHHH", 0, 1, RING, last_batch_head, used_idx)
        for head in range(RING):
            flag, counter, nxt = states.get(head, (0, 0, 0))
            raw += struct.pack("<B5xHQ", flag, nxt, counter)
        return raw + bytes(region_size - len(raw))

    rest = struct.pack("<Q", ALL) + ring(write, [3]) + data(pieces)
    yield "fresh", bytes(region_size) + bytes([0]) + rest
    yield "two-in-flight", region(1, {0: (1, 4, 0), 3: (1, 6, 0)}) + bytes([1]) + rest
    yield "last-batch", region(0, {0: (1, 1, 3), 3: (1, 2, 0)}, last_batch_head=0) + bytes([1]) + rest


def api_seeds():
    """Requests: a method byte, a path byte, a body length (u16), the body, a listener byte."""
    def request(method, path, body=b"", metrics_only=0):
        return bytes([method, path]) + struct.pack("<H", len(body)) + body + bytes([metrics_only])
    rule = b'{"rules":[{"op":"read","sectors":[0,8],"trigger":{"every":2},"seed":1,"action":{"delay":[1,5]}}]}'
    limit = b'{"limits":{"all":{"ops":1000,"bw":1e6,"ops_burst":10}}}'
    yield "put-faults", request(1, 2, rule) + request(0, 0) + request(2, 2)
    yield "put-limits", request(1, 3, limit) + request(0, 3) + request(0, 1, b"", 1)
    yield "bad", request(1, 2, b'{"rules":[{"action":"drop"}]}') + request(3, 5)


for target, seeds in [("api", api_seeds), ("inflight", inflight_seeds), ("backend", backend_seeds), ("blk", blk_seeds), ("net", net_seeds), ("console", console_seeds), ("mmio", mmio_seeds),
                      ("relay", relay_seeds), ("protocol", protocol_seeds)]:
    folder = os.path.join(HERE, "corpus", target)
    os.makedirs(folder, exist_ok=True)
    for name, raw in seeds():
        with open(os.path.join(folder, f"seed-{name}"), "wb") as out:
            out.write(raw)
