#!/usr/bin/env node
// The official tus server (npm @tus/server with @tus/file-store), as a peer
// for hotfolder's integration tests (tests/tus_peer.rs): a real, independent
// implementation of tus 1.0.0 rather than our own sandbox.
//
//   node tests/peers/tus-server.mjs --dir DIR [--port N] [--exit-on-stdin-close]
//
// DIR (or $TUS_PEER_DIR) is the FileStore folder: each upload is DIR/<id>
// with its info in DIR/<id>.json. N (or $TUS_PEER_PORT; 0 = any free port)
// is the port on 127.0.0.1. Prints exactly one line to stdout once it
// listens: "tus server listening on http://127.0.0.1:PORT/files/".
// Exits on SIGTERM/SIGINT, and with --exit-on-stdin-close when stdin closes
// (so a test process that dies without cleaning up leaves no server behind).
// Everything else is the server's defaults: OPTIONS answers with the
// FileStore's extensions, Location is absolute (built from the Host header).
// Set DEBUG=tus-node-server:* for the server's own request log on stderr.

import { FileStore } from '@tus/file-store';
import { Server } from '@tus/server';

function option(name, envName, fallback) {
  const at = process.argv.indexOf(`--${name}`);
  if (at !== -1 && at + 1 < process.argv.length) {
    return process.argv[at + 1];
  }
  return process.env[envName] ?? fallback;
}

const directory = option('dir', 'TUS_PEER_DIR');
if (!directory) {
  console.error('tus-server.mjs: --dir DIR (or TUS_PEER_DIR) is required');
  process.exit(2);
}
const port = Number(option('port', 'TUS_PEER_PORT', '0'));
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  console.error(`tus-server.mjs: bad port ${option('port', 'TUS_PEER_PORT')}`);
  process.exit(2);
}

const tus = new Server({
  // Without a trailing slash: the server appends "/<id>" to build Location.
  path: '/files',
  datastore: new FileStore({ directory }),
});

const http = tus.listen(port, '127.0.0.1', () => {
  const { port: bound } = http.address();
  process.stdout.write(`tus server listening on http://127.0.0.1:${bound}/files/\n`);
});
http.on('error', (error) => {
  console.error(`tus-server.mjs: ${error.message}`);
  process.exit(1);
});

function stop() {
  // Open keep-alive connections would hold close() up; the tests want a prompt exit.
  http.closeAllConnections?.();
  http.close(() => process.exit(0));
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
if (process.argv.includes('--exit-on-stdin-close')) {
  process.stdin.on('end', stop);
  process.stdin.on('error', stop);
  process.stdin.resume();
}
