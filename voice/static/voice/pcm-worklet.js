/*
 * Intelia Voice — microphone capture AudioWorklet.
 *
 * Runs on the audio rendering thread. Takes the microphone at the AudioContext rate (44.1 or 48 kHz in
 * Chromium), mixes it to mono, low-pass filters it below the 12 kHz Nyquist limit of the target rate
 * (windowed-sinc FIR, so downsampling does not alias), resamples it to 24 kHz by linear interpolation,
 * converts it to signed 16-bit little-endian PCM and posts one frame per 40 ms (960 samples = 1920 bytes)
 * to the main thread, with the frame's RMS level (0..1) for a level meter.
 *
 * Messages posted: {type: "frame", pcm: ArrayBuffer (1920 bytes), rms: number}
 * Messages accepted: {type: "flush"} (post the partial frame, zero-padded) and {type: "reset"}.
 */

const DEFAULT_TARGET_RATE = 24000;
const DEFAULT_FRAME_SAMPLES = 960; // 40 ms at 24 kHz

/** Windowed-sinc (Blackman) low-pass FIR taps; `cutoff` in Hz, normalised to unity DC gain. */
function designLowpass(rate, cutoff, numTaps) {
  const taps = new Float32Array(numTaps);
  const fc = cutoff / rate; // cycles per sample
  const mid = (numTaps - 1) / 2;
  let sum = 0;
  for (let i = 0; i < numTaps; i++) {
    const n = i - mid;
    const sinc = n === 0 ? 2 * fc : Math.sin(2 * Math.PI * fc * n) / (Math.PI * n);
    const w = 0.42 - 0.5 * Math.cos((2 * Math.PI * i) / (numTaps - 1)) + 0.08 * Math.cos((4 * Math.PI * i) / (numTaps - 1));
    taps[i] = sinc * w;
    sum += taps[i];
  }
  for (let i = 0; i < numTaps; i++) taps[i] /= sum;
  return taps;
}

class PcmCaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.targetRate = opts.targetRate || DEFAULT_TARGET_RATE;
    this.frameSamples = opts.frameSamples || DEFAULT_FRAME_SAMPLES;
    // `sampleRate` is the AudioContext rate (a global of the worklet scope).
    this.step = sampleRate / this.targetRate; // input samples per output sample
    if (this.step > 1) {
      // Pass band up to ~10.8 kHz, stop band from 12 kHz: 0.45 * target rate.
      this.taps = designLowpass(sampleRate, 0.45 * this.targetRate, 47);
    } else {
      this.taps = new Float32Array([1]); // upsampling (rare): interpolation only
    }
    this.history = new Float32Array(this.taps.length * 2); // doubled ring: contiguous reads
    this.histPos = 0;
    this.prev = 0; // previous filtered sample
    this.t = 0; // position of the next output sample, relative to `prev` (0 <= t < 1 when due)
    this.out = new DataView(new ArrayBuffer(this.frameSamples * 2));
    this.outLen = 0;
    this.sumSquares = 0;
    this.port.onmessage = (event) => {
      const data = event.data || {};
      if (data.type === "flush" && this.outLen > 0) {
        this.postFrame();
      } else if (data.type === "reset") {
        this.outLen = 0;
        this.sumSquares = 0;
      }
    };
  }

  filter(x) {
    const n = this.taps.length;
    const h = this.history;
    h[this.histPos] = x;
    h[this.histPos + n] = x;
    this.histPos = (this.histPos + 1) % n;
    // h[histPos .. histPos + n) holds the last n samples, oldest first.
    let acc = 0;
    const taps = this.taps;
    const base = this.histPos;
    for (let i = 0; i < n; i++) acc += taps[i] * h[base + i];
    return acc;
  }

  emit(sample) {
    const s = sample > 1 ? 1 : sample < -1 ? -1 : sample;
    this.sumSquares += s * s;
    this.out.setInt16(this.outLen * 2, s < 0 ? s * 0x8000 : s * 0x7fff, true);
    this.outLen += 1;
    if (this.outLen === this.frameSamples) this.postFrame();
  }

  postFrame() {
    const count = this.outLen || 1;
    const rms = Math.sqrt(this.sumSquares / count);
    const buffer = this.out.buffer;
    this.port.postMessage({ type: "frame", pcm: buffer, rms }, [buffer]);
    this.out = new DataView(new ArrayBuffer(this.frameSamples * 2));
    this.outLen = 0;
    this.sumSquares = 0;
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0 || !input[0]) return true;
    const channels = input.length;
    const length = input[0].length;
    for (let i = 0; i < length; i++) {
      let x = input[0][i];
      if (channels > 1) {
        for (let c = 1; c < channels; c++) x += input[c][i];
        x /= channels;
      }
      const y = this.filter(x);
      // Output samples falling between the previous filtered sample and this one: interpolate.
      while (this.t < 1) {
        this.emit(this.prev + this.t * (y - this.prev));
        this.t += this.step;
      }
      this.t -= 1;
      this.prev = y;
    }
    return true;
  }
}

registerProcessor("pcm-capture", PcmCaptureProcessor);
