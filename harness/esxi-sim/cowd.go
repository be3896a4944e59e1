package main

// VMware's VMFSSPARSE redo-log extent ("COWD": the -delta.vmdk a snapshot creates on VMFS5 and
// earlier, createType="vmfsSparse" in its descriptor), written and read by the harness so that
// the chain of a VM with snapshots is what a host leaves on its datastore and what a real reader
// (qemu-img's vmdk driver) combines.
//
// Layout (little endian, sectors of 512 bytes):
//
//	sector 0-3   header: "COWD", version 1, flags 3, numSectors, grainSize (sectors),
//	             gdOffset (sector), numGDEntries, freeSector; for a redo log the parent's file
//	             name (1024 bytes) and generation follow; the rest is zero
//	gdOffset     grain directory: numGDEntries uint32, the sector of each grain table (0 = none)
//	...          grain tables of 4096 uint32 (the sector of each grain, 0 = not in this layer)
//	             and the grains, appended in the order they are first written
//
// A grain not in the layer reads through to the parent. Writes smaller than a grain copy the
// rest of the grain from below first (copy on write), as the host does.

import (
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"sort"
)

const (
	cowdGTEs       = 4096 // entries per grain table
	cowdHdrSectors = 4
	cowdGrain      = 1 // sectors per grain (ESX redo logs: 1, the backing's deltaGrainSize 512)
)

type cowd struct {
	f       *os.File
	sectors int64 // disk size in sectors
	grain   int64 // sectors per grain
	gdOff   int64 // sector of the grain directory
	gd      []uint32
	gts     map[int][]uint32 // grain tables read so far, by directory index
	free    int64            // next free sector
}

// createCOWD writes an empty redo log for a disk of size bytes whose parent is parentName.
func createCOWD(path string, size int64, parentName string) error {
	if size <= 0 || size%512 != 0 {
		return fmt.Errorf("disk size %d is not a positive multiple of 512", size)
	}
	sectors := size / 512
	perGT := int64(cowdGTEs * cowdGrain)
	ngd := (sectors + perGT - 1) / perGT
	gdSectors := (ngd*4 + 511) / 512
	free := int64(cowdHdrSectors) + gdSectors
	hdr := make([]byte, cowdHdrSectors*512)
	copy(hdr[0:4], "COWD")
	le := binary.LittleEndian
	le.PutUint32(hdr[4:], 1)
	le.PutUint32(hdr[8:], 3)
	le.PutUint32(hdr[12:], uint32(sectors))
	le.PutUint32(hdr[16:], cowdGrain)
	le.PutUint32(hdr[20:], cowdHdrSectors)
	le.PutUint32(hdr[24:], uint32(ngd))
	le.PutUint32(hdr[28:], uint32(free))
	copy(hdr[32:32+1023], parentName) // parentFileName[1024]
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0644)
	if err != nil {
		return err
	}
	if _, err := f.WriteAt(hdr, 0); err == nil {
		err = f.Truncate(free * 512)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
	}
	return err
}

// openCOWD opens a redo log for reading and writing.
func openCOWD(path string) (*cowd, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	hdr := make([]byte, 32)
	if _, err := f.ReadAt(hdr, 0); err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: reading the header: %v", path, err)
	}
	if string(hdr[0:4]) != "COWD" {
		f.Close()
		return nil, fmt.Errorf("%s: not a VMFSSPARSE (COWD) extent", path)
	}
	le := binary.LittleEndian
	c := &cowd{f: f, sectors: int64(le.Uint32(hdr[12:])), grain: int64(le.Uint32(hdr[16:])),
		free: int64(le.Uint32(hdr[28:])), gts: map[int][]uint32{}, gdOff: int64(le.Uint32(hdr[20:]))}
	gdOff, ngd := c.gdOff, int64(le.Uint32(hdr[24:]))
	if c.grain <= 0 || ngd*cowdGTEs*c.grain < c.sectors || ngd > 1<<24 {
		f.Close()
		return nil, fmt.Errorf("%s: inconsistent COWD header", path)
	}
	raw := make([]byte, ngd*4)
	if _, err := f.ReadAt(raw, gdOff*512); err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: reading the grain directory: %v", path, err)
	}
	c.gd = make([]uint32, ngd)
	for i := range c.gd {
		c.gd[i] = le.Uint32(raw[i*4:])
	}
	return c, nil
}

func (c *cowd) Close() {
	if c != nil && c.f != nil {
		c.f.Close()
		c.f = nil
	}
}

func (c *cowd) grainBytes() int64 { return c.grain * 512 }

func (c *cowd) grains() int64 { return (c.sectors + c.grain - 1) / c.grain }

func (c *cowd) table(i int) ([]uint32, error) {
	if t, ok := c.gts[i]; ok {
		return t, nil
	}
	if c.gd[i] == 0 {
		return nil, nil
	}
	raw := make([]byte, cowdGTEs*4)
	if _, err := c.f.ReadAt(raw, int64(c.gd[i])*512); err != nil {
		return nil, err
	}
	t := make([]uint32, cowdGTEs)
	for j := range t {
		t[j] = binary.LittleEndian.Uint32(raw[j*4:])
	}
	c.gts[i] = t
	return t, nil
}

// sectorOf returns the file sector of grain g, 0 when the grain is not in this layer.
func (c *cowd) sectorOf(g int64) (int64, error) {
	t, err := c.table(int(g / cowdGTEs))
	if err != nil || t == nil {
		return 0, err
	}
	return int64(t[g%cowdGTEs]), nil
}

// overlay copies the grains of this layer that cover [off, off+len(buf)) into buf.
func (c *cowd) overlay(off int64, buf []byte) error {
	gb := c.grainBytes()
	end := off + int64(len(buf))
	for g := off / gb; g*gb < end && g < c.grains(); {
		s, err := c.sectorOf(g)
		if err != nil {
			return err
		}
		if s == 0 {
			g++
			continue
		}
		// A run of grains stored one after the other: one read.
		n := int64(1)
		for (g+n)*gb < end && g+n < c.grains() {
			s2, err := c.sectorOf(g + n)
			if err != nil {
				return err
			}
			if s2 != s+n*c.grain {
				break
			}
			n++
		}
		lo, hi := g*gb, (g+n)*gb
		if lo < off {
			lo = off
		}
		if hi > end {
			hi = end
		}
		if _, err := c.f.ReadAt(buf[lo-off:hi-off], s*512+(lo-g*gb)); err != nil && err != io.EOF {
			return err
		}
		g += n
	}
	return nil
}

// writeGrains stores whole grains starting at grain g (len(data) a multiple of the grain
// size): grains already in the layer are overwritten in place, new ones appended together.
func (c *cowd) writeGrains(g int64, data []byte) error {
	gb := c.grainBytes()
	if int64(len(data))%gb != 0 || g < 0 || g+int64(len(data))/gb > c.grains() {
		return fmt.Errorf("COWD write of %d bytes at grain %d is not whole grains inside the disk", len(data), g)
	}
	n := int64(len(data)) / gb
	var fresh []int64 // indexes (relative to g) of grains to allocate
	for i := int64(0); i < n; i++ {
		s, err := c.sectorOf(g + i)
		if err != nil {
			return err
		}
		if s != 0 {
			if _, err := c.f.WriteAt(data[i*gb:(i+1)*gb], s*512); err != nil {
				return err
			}
			continue
		}
		fresh = append(fresh, i)
	}
	if len(fresh) == 0 {
		return nil
	}
	le := binary.LittleEndian
	// Grain tables first (allocated at the end of the file), then the grains after them.
	for _, i := range fresh {
		ti := int((g + i) / cowdGTEs)
		if c.gd[ti] != 0 {
			continue
		}
		if _, err := c.table(ti); err != nil {
			return err
		}
		if c.gts[ti] != nil {
			continue
		}
		sec := c.free
		c.free += cowdGTEs * 4 / 512
		if err := c.f.Truncate(c.free * 512); err != nil {
			return err
		}
		c.gts[ti] = make([]uint32, cowdGTEs)
		c.gd[ti] = uint32(sec)
		var b [4]byte
		le.PutUint32(b[:], uint32(sec))
		if _, err := c.f.WriteAt(b[:], c.gdOff*512+int64(ti)*4); err != nil {
			return err
		}
	}
	// The new grains, in runs of consecutive indexes.
	for k := 0; k < len(fresh); {
		j := k + 1
		for j < len(fresh) && fresh[j] == fresh[j-1]+1 {
			j++
		}
		first, cnt := fresh[k], int64(j-k)
		sec := c.free
		if _, err := c.f.WriteAt(data[first*gb:(first+cnt)*gb], sec*512); err != nil {
			return err
		}
		c.free += cnt * c.grain
		for i := int64(0); i < cnt; i++ {
			gi := g + first + i
			t := c.gts[int(gi/cowdGTEs)]
			t[gi%cowdGTEs] = uint32(sec + i*c.grain)
			var b [4]byte
			le.PutUint32(b[:], t[gi%cowdGTEs])
			if _, err := c.f.WriteAt(b[:], int64(c.gd[gi/cowdGTEs])*512+(gi%cowdGTEs)*4); err != nil {
				return err
			}
		}
		k = j
	}
	var b [4]byte
	le.PutUint32(b[:], uint32(c.free))
	_, err := c.f.WriteAt(b[:], 28)
	return err
}

// allocated lists the grains stored in this layer, in disk order.
func (c *cowd) allocated() ([]int64, error) {
	var out []int64
	for i := range c.gd {
		t, err := c.table(i)
		if err != nil {
			return nil, err
		}
		for j, s := range t {
			if s != 0 {
				out = append(out, int64(i)*cowdGTEs+int64(j))
			}
		}
	}
	sort.Slice(out, func(a, b int) bool { return out[a] < out[b] })
	return out, nil
}

func (c *cowd) sync() error { return c.f.Sync() }
