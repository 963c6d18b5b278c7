import os, sys
import asyncio
from p2psc.p2phandler import P2PHandler
from p2psc.udp_p2p import UdpP2P
from appPublic.jsonConfig import getConfig

class Server(UdpP2P):
    def on_recv(self, data, addr):
        self.send(b'recv:' + data, addr)

if __name__ == '__main__':
    pwd = os.getcwd()
    config = getConfig(pwd)
    # The original used asyncio.get_event_loop(), which Python 3.14 no longer allows
    # outside a running loop; new_event_loop() works on every version.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    p2p = P2PHandler(loop=loop)
    loop.run_until_complete(p2p.run_as_udp_server(ProtocolClass=Server))
    loop.run_forever()
