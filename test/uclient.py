import os, sys
import asyncio
from p2psc.udp_p2p import UdpP2P
from p2psc.p2phandler import P2PHandler
from appPublic.jsonConfig import getConfig

class Client(UdpP2P):
    def on_handshaked(self):
        self.send(b'this is a test text')

    def on_recv(self, data, addr):
        d = data.decode('utf-8')
        print('data receive=', d)
        self.stop()
        loop = asyncio.get_running_loop()
        loop.stop()

exitcode = 0

async def connect(p2p, peer_id):
    global exitcode
    # The INIT is retransmitted until the server answers (udp_handshake_timeout, 15 s).
    transport, protocol = await p2p.connect_udp_peer(peer_id, ProtocolClass=Client)
    try:
        await protocol.wait_handshaked()
    except Exception as e:
        print('handshake failed:', e, file=sys.stderr)
        asyncio.get_running_loop().stop()
        exitcode = 2
    return transport, protocol

if __name__ == '__main__':
    pwd = os.getcwd()
    config = getConfig(pwd)
    if len(sys.argv) < 2:
        print('Usage:\n%s peerid' % sys.argv[0])
        sys.exit(1)

    # The original used asyncio.get_event_loop(), which Python 3.14 no longer allows
    # outside a running loop; new_event_loop() works on every version.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    p2p = P2PHandler(loop=loop)
    loop.create_task(connect(p2p, sys.argv[1]))
    loop.run_forever()
    sys.exit(exitcode)
