import os, sys
import asyncio
from p2psc.p2p import TcpP2P
from p2psc.p2phandler import P2PHandler
from appPublic.jsonConfig import getConfig

class Client(TcpP2P):
    def on_handshaked(self):
        self.send(b'this is a test text')

    def on_recv(self, data):
        d = data.decode('utf-8')
        print('data receive=', d)
        self.transport.close()
        loop = asyncio.get_running_loop()
        loop.stop()

    def on_closed(self, exc):
        # a failed handshake or a lost connection ends the client too, with one line
        global exitcode
        if exc is not None:
            print('connection failed:', exc, file=sys.stderr)
            exitcode = 1
        asyncio.get_running_loop().stop()

exitcode = 0

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
    try:
        c = loop.run_until_complete(p2p.connect_peer(sys.argv[1], ProtocolClass=Client))
    except Exception as e:
        print('connection failed:', e, file=sys.stderr)
        sys.exit(1)
    loop.run_forever()
    sys.exit(exitcode)
