# Captures port-53 packets (from the IP header on) on one interface into numbered files.
import os, socket, struct, sys, time
iface, outdir, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(3))
s.bind((iface, 0))
s.settimeout(0.2)
os.makedirs(outdir, exist_ok=True)
n = 0
end = time.time() + seconds
while time.time() < end:
    try:
        data = s.recv(65535)
    except socket.timeout:
        continue
    v = data[0] >> 4
    if v == 4:
        off = (data[0] & 15) * 4; proto = data[9]
    elif v == 6:
        off = 40; proto = data[6]
    else:
        continue
    if proto not in (6, 17): continue
    sp, dp = struct.unpack("!HH", data[off:off+4])
    if 53 not in (sp, dp): continue
    open(os.path.join(outdir, "%03d.bin" % n), "wb").write(data)
    n += 1
print(outdir, n)
