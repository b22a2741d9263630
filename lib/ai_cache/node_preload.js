// Loaded by with-ai-cache into every Node.js process (NODE_OPTIONS=--require ...) so that
// the global fetch -- what the official openai and @anthropic-ai/sdk packages use --
// goes through HTTPS_PROXY on Node.js releases that ignore NODE_USE_ENV_PROXY.
// NODE_USE_ENV_PROXY covers fetch from Node.js 24.0.0 and 22.21.0 on: nothing to do there.
// Elsewhere undici's EnvHttpProxyAgent (which honours NO_PROXY) becomes the global
// dispatcher, created on first use so that processes that never fetch (npm, test
// workers) do not pay the ~60 ms of loading undici. It must never break the program:
// on any failure it prints one line to stderr and fetch goes direct, as without it.
'use strict';

const [major, minor] = process.versions.node.split('.').map(Number);
// with-ai-cache asks this (node -p) to decide whether to install undici.
exports.nativeEnvProxy = major >= 24 || (major === 22 && minor >= 21);

(function () {
  const env = process.env;
  const proxied = env.HTTPS_PROXY || env.https_proxy || env.HTTP_PROXY || env.http_proxy;
  if (!proxied || exports.nativeEnvProxy) return;

  const path = require('path');
  // Node's own fetch and every copy of undici share the dispatcher through this symbol.
  const DISPATCHER = Symbol.for('undici.globalDispatcher.1');

  function undiciDirs() {
    // The copy with-ai-cache installed (the version it was tested with), then the project's.
    const dirs = env.AI_CACHE_UNDICI ? [env.AI_CACHE_UNDICI] : [];
    try {
      dirs.push(path.dirname(require.resolve('undici/package.json', { paths: [process.cwd()] })));
    } catch (e) { /* the project has no undici */ }
    return dirs;
  }

  function proxyAgent() {
    for (const dir of undiciDirs()) {
      let EnvHttpProxyAgent;
      try {
        const loading = require.cache[require.resolve(dir)];
        if (loading && !loading.loaded) continue; // the program's own require of it got us here
        ({ EnvHttpProxyAgent } = require(dir));
      } catch (e) {
        continue;
      }
      if (typeof EnvHttpProxyAgent !== 'function') continue; // undici < 6.11
      const emitWarning = process.emitWarning;
      process.emitWarning = function (warning, options, ...rest) {
        if (options && options.code === 'UNDICI-EHPA') return; // "EnvHttpProxyAgent is experimental"
        return emitWarning.call(process, warning, options, ...rest);
      };
      try {
        return new EnvHttpProxyAgent();
      } finally {
        process.emitWarning = emitWarning;
      }
    }
    throw new Error('no usable undici (>= 6.11); with-ai-cache installs one when it can run npm');
  }

  function settle(value) {
    Object.defineProperty(globalThis, DISPATCHER, { value, writable: true, configurable: true });
  }

  function warn(e) {
    process.stderr.write(`ai-cache: Node.js ${process.version} fetch will NOT use the proxy: ${e.message}\n`);
  }

  if (globalThis[DISPATCHER] !== undefined) return; // someone chose a dispatcher already
  try {
    Object.defineProperty(globalThis, DISPATCHER, {
      configurable: true,
      get() {
        settle(undefined); // loading undici reads the dispatcher: no recursion into this getter
        try {
          globalThis[DISPATCHER] = proxyAgent(); // writable, also once undici has defined it
        } catch (e) {
          warn(e); // Node's fetch then uses its own direct Agent, as without this preload
        }
        return globalThis[DISPATCHER];
      },
      set: settle,
    });
  } catch (e) {
    warn(e);
  }
})();
