/**
 * Text that comes from the guest (its console, output, the VMM's lines about it) as it may appear
 * in a message of ours: every line cut to `maxLine` characters, control bytes other than tab shown
 * as '?', at most the last `maxLines` non-empty lines. The one filter for guest text in messages.
 */
export function guestLines(text: string, maxLines = 8, maxLine = 300): string[] {
  return (
    text
      .replace(/\r/g, '')
      // eslint-disable-next-line no-control-regex -- keeping tab and newline, replacing the other control bytes is the point
      .replace(/[^\x09\x0a\x20-\x7e\u00a0-\uffff]/g, '?')
      .split('\n')
      .filter((l) => l.trim())
      .slice(-maxLines)
      .map((l) => l.slice(0, maxLine))
  );
}

/** `guestLines` indented under a label, or '' when there is nothing. */
export function guestBlock(label: string, text: string, maxLines = 8): string {
  const lines = guestLines(text, maxLines);
  return lines.length ? `\n${label}:\n${lines.map((l) => `  ${l}`).join('\n')}` : '';
}
