import gzip, numpy as np, torch, torch.nn as nn, torch.nn.functional as F, sys, time, os
torch.set_num_threads(1)
D='/usr/share/datasets/fashion-mnist/'
def idx(name):
    p=D+name
    op=gzip.open if p.endswith('.gz') else open
    with op(p,'rb') as f: b=f.read()
    nd=b[3]; dims=[int.from_bytes(b[4+4*i:8+4*i],'big') for i in range(nd)]
    return np.frombuffer(b,dtype=np.uint8,offset=4+4*nd).reshape(dims)
files=sorted(os.listdir(D))
def find(s): return [f for f in files if s in f][0]
xtr=torch.tensor(idx(find('train-images'))).float().div(255).unsqueeze(1); ytr=torch.tensor(idx(find('train-labels'))).long()
xte=torch.tensor(idx(find('t10k-images'))).float().div(255).unsqueeze(1); yte=torch.tensor(idx(find('t10k-labels'))).long()
arch, n, hidden, epochs, dec, lr = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
bs=int(sys.argv[7]) if len(sys.argv)>7 else 16
eps=float(sys.argv[8]) if len(sys.argv)>8 else 0.1
torch.manual_seed(0)
g=torch.Generator().manual_seed(0); perm=torch.randperm(60000,generator=g)
tr=perm[:n]; va=perm[-500:]
if arch=='mlp':
    net=nn.Sequential(nn.Flatten(), nn.Linear(784,hidden), nn.ReLU(), nn.Linear(hidden,hidden), nn.ReLU(), nn.Linear(hidden,10))
else:
    w=hidden
    net=nn.Sequential(nn.Conv2d(1,w,3),nn.BatchNorm2d(w),nn.ReLU(),nn.Conv2d(w,w,3),nn.BatchNorm2d(w),nn.ReLU(),nn.MaxPool2d(2),
        nn.Conv2d(w,2*w,3),nn.BatchNorm2d(2*w),nn.ReLU(),nn.Conv2d(2*w,2*w,3),nn.BatchNorm2d(2*w),nn.ReLU(),nn.MaxPool2d(2),nn.Flatten(),
        nn.Linear(2*w*16,200),nn.ReLU(),nn.Linear(200,200),nn.ReLU(),nn.Linear(200,10))
opt=torch.optim.SGD(net.parameters(),lr=lr,momentum=0.9)
def pgd(x,y,steps,step=eps/4):
    d=(torch.rand_like(x)*2-1)*eps; d=(x+d).clamp(0,1)-x
    for _ in range(steps):
        d.requires_grad_(True)
        l=F.cross_entropy(net(x+d),y); g,=torch.autograd.grad(l,d)
        d=(d.detach()+step*g.sign()).clamp(-eps,eps); d=(x+d).clamp(0,1)-x
    return (x+d).detach()
def acc(idx_,X,Y,steps=5):
    net.eval(); c=0
    for i in range(0,len(idx_),500):
        x,y=X[idx_[i:i+500]],Y[idx_[i:i+500]]
        xa=pgd(x,y,steps)
        with torch.no_grad(): c+=(net(xa).argmax(1)==y).sum().item()
    return 100*c/len(idx_)
te=torch.arange(500)
t0=time.time()
for ep in range(1,epochs+1):
    if ep==dec:
        for gr in opt.param_groups: gr['lr']=lr*0.1
    p=tr[torch.randperm(n)]; cor=0
    for i in range(0,n-bs+1,bs):
        x,y=xtr[p[i:i+bs]],ytr[p[i:i+bs]]
        net.eval(); xa=pgd(x,y,5); net.train()
        out=net(xa); loss=F.cross_entropy(out,y); opt.zero_grad(); loss.backward(); opt.step()
        cor+=(out.argmax(1)==y).sum().item()
    if ep%4==0 or ep==epochs:
        print(ep, 'trr %.1f'%(100*cor/(n//bs*bs)), 'val %.1f'%acc(va,xtr,ytr), 'test %.1f'%acc(te,xte,yte), '%.0fs'%(time.time()-t0), flush=True)
