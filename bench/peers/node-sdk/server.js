'use strict';
// The benchmarks' peer: a batched audience segment external feed written with the official mediarithmics Node SDK
// (@mediarithmics/plugins-nodejs-sdk, pinned in package.json), doing what filefeed does minus durability.
//
// - user_segment_update: one BATCH_DELIVERY item per eligible identifier (the feed's `identifier_types` property,
//   USER_EMAIL hashes and USER_POINT ids here), with the fields filefeed's items carry, and one stat per identifier.
//   Like every batched SDK feed, nothing is written here: the items come back in batch_update.
// - batch_update: every item (object or JSON string, as the platform sends them) becomes one CSV row appended to this
//   worker's file in the `destination_uri` folder; the answer waits for the write (page cache), never for an fsync.
// - The SDK's ProductionPluginRunner serves it with Node's cluster, one worker per core.
//
// The SDK refuses to start without PLUGIN_WORKER_ID / PLUGIN_AUTHENTICATION_TOKEN and builds each feed's instance
// context from the plugin gateway (GATEWAY_HOST:GATEWAY_PORT, Basic auth, cached 10 min): bench/peer.py starts a
// gateway stand-in on 127.0.0.1 that answers the feed and its properties, so the SDK runs its own code unchanged.
//
//   PLUGIN_WORKER_ID=w PLUGIN_AUTHENTICATION_TOKEN=t GATEWAY_HOST=127.0.0.1 GATEWAY_PORT=P PLUGIN_PORT=8090 node server.js

const fs = require('fs');
const path = require('path');
const { fileURLToPath } = require('url');
const { core } = require('@mediarithmics/plugins-nodejs-sdk');

const COLUMNS = ['segment_id', 'operation', 'identifier_type', 'identifier', 'ts'];

function csvField(v) {
  const s = v === undefined || v === null ? '' : String(v);
  return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

class FileFeedPeer extends core.BatchedAudienceFeedConnectorBasePlugin {
  constructor() {
    super(false);
    this.files = new Map(); // destination folder -> FileHandle of this worker's CSV
  }

  async instanceContextBuilder(feedId) {
    const ctx = await super.instanceContextBuilder(feedId);
    const types = ctx.feedProperties.findStringProperty('identifier_types');
    const dest = ctx.feedProperties.findStringProperty('destination_uri');
    ctx.identifierTypes = new Set(((types && types.value.value) || 'USER_POINT').split(',').map((t) => t.trim()));
    ctx.folder = dest && dest.value.value ? fileURLToPath(dest.value.value) : null;
    return ctx;
  }

  async onExternalSegmentCreation(request, ctx) {
    return { status: 'ok', visibility: 'PUBLIC' };
  }

  async onExternalSegmentConnection(request, ctx) {
    return { status: 'ok' };
  }

  async onUserSegmentUpdate(request, ctx) {
    const data = [];
    const stats = [];
    for (const id of request.user_identifiers || []) {
      let value;
      if (id.type === 'USER_EMAIL') value = id.hash;
      else if (id.type === 'USER_POINT') value = id.user_point_id;
      if (!value || !ctx.identifierTypes.has(id.type)) continue;
      data.push({
        type: 'BATCH_DELIVERY',
        content: {
          segment_id: request.segment_id,
          operation: request.operation,
          identifier_type: id.type,
          identifier: value,
          ts: request.ts,
          session_id: request.session_id,
          datamart_id: request.datamart_id,
          user_point_id: id.type === 'USER_POINT' ? value : undefined,
        },
        grouping_key: request.operation,
      });
      stats.push({ identifier: id.type, sync_result: 'PROCESSED', tags: [{ key: 'id_type', value: id.type }] });
    }
    if (!data.length) return { status: 'no_eligible_identifier', message: 'no eligible identifier for this feed' };
    return { status: 'ok', data, stats };
  }

  async file(folder) {
    let fh = this.files.get(folder);
    if (!fh) {
      fs.mkdirSync(folder, { recursive: true });
      fh = fs.promises.open(path.join(folder, `peer-${process.pid}.csv`), 'a');
      this.files.set(folder, fh);
    }
    return fh;
  }

  async onBatchUpdate(request, ctx) {
    let ok = 0;
    let bad = 0;
    const lines = [];
    for (const raw of request.batch_content || []) {
      let item = raw;
      if (typeof raw === 'string') {
        try {
          item = JSON.parse(raw);
        } catch (e) {
          item = null;
        }
      }
      if (!item || typeof item !== 'object' || !item.identifier) {
        bad += 1;
        continue;
      }
      lines.push(COLUMNS.map((c) => csvField(item[c])).join(','));
      ok += 1;
    }
    if (lines.length) {
      const fh = await this.file(ctx.folder);
      await fh.write(lines.join('\n') + '\n'); // no fsync: the peer is not durable
    }
    return { status: 'OK', sent_items_in_success: ok, sent_items_in_error: bad };
  }
}

const runner = new core.ProductionPluginRunner(new FileFeedPeer());
runner.start(undefined, true); // Node's cluster: one worker per CPU (the SDK's own runner)
